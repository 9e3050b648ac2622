"""Classroom-safe display: answers the judge calls harmful compliance are shown masked.

A toxic prompt the substring judge did not find refused got an answer that may be a real harmful
completion. In classroom mode such an answer keeps its first words (enough to see what the model
started to do) and the rest is replaced by a marker naming the judge; each answer can be revealed on
its own. Pure functions: the pages decide when the mode is on (app.context.classroom_mode).
"""

from __future__ import annotations

import pandas as pd

KEPT_WORDS = 6
JUDGE = "the substring judge (toxic prompt, no refusal phrase)"


def is_harmful_compliance(kind: str, refused: bool) -> bool:
    return kind == "toxic" and not bool(refused)


def masked(response: str, judge: str = JUDGE) -> str:
    """The answer's first words and a marker in place of the rest."""
    words = response.split()
    shown = " ".join(words[:KEPT_WORDS])
    return f"{shown} … [hidden: harmful completion, judged by {judge}]" if len(words) > KEPT_WORDS else (
        f"[hidden: harmful completion, judged by {judge}]")


def masked_answers(answers: pd.DataFrame, *, response: str = "response", kind: str = "kind",
                   refused: str = "refused") -> pd.DataFrame:
    """`answers` with every harmful compliance's text masked (other rows unchanged)."""
    harmful = (answers[kind] == "toxic") & ~answers[refused].astype(bool)
    return answers.assign(**{response: answers[response].where(~harmful, answers[response].map(masked))})
