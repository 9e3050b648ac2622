"""Every judge's label on an answer side by side, and how well each pair of judges agrees."""

from __future__ import annotations

import itertools

import pandas as pd

from engine.stats import cohen_kappa

# Each judge's label column in JUDGE_LABELS_SQL: True = refused.
JUDGES = {"substring judge": "substring_judge", "refusal score > 0": "refusal_score_judge"}


def judge_agreement_matrix(labels: pd.DataFrame) -> pd.DataFrame:
    """Cohen's kappa and raw agreement for every pair of judges, per model."""
    rows = []
    for model, answers in labels.groupby("model"):
        for (name_a, a), (name_b, b) in itertools.combinations(JUDGES.items(), 2):
            rows.append({"model": model, "judge A": name_a, "judge B": name_b, "answers": len(answers),
                         "agree": float((answers[a] == answers[b]).mean()),
                         "Cohen's kappa": cohen_kappa(answers[a], answers[b])})
    return pd.DataFrame(rows)
