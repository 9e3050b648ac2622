"""Answers generated under interventions, judged by both judges."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from engine.judging.judge import refusal_score
from engine.judging.refusal_phrases import is_refusal
from engine.runtime.generation import answer_table
from engine.runtime.interventions import Hook, applied
from engine.runtime.models import LoadedModel
from engine.runtime.scoring import next_token_logprobs


def judged_answers(model: LoadedModel, prompts: pd.DataFrame, condition: str, hooks: Sequence[Hook],
                   token_ids: Sequence[int], *, max_new_tokens: int, batch_size: int) -> pd.DataFrame:
    """Answers under `hooks`, judged by both judges (score under the same intervention)."""
    with applied(model, hooks):
        answers = answer_table(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               desc=condition)
        scores = refusal_score(next_token_logprobs(model, list(prompts["text"]), batch_size=batch_size,
                                                   token_ids=token_ids))
    answers["refused"] = [is_refusal(t) for t in answers["response"]]
    answers["refusal_score"] = scores
    return answers.assign(condition=condition)
