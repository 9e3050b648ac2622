"""Is the refusal direction a phrasing detector? A probe for a prompt's surface form.

On benign prompts only (so harm plays no part), the form direction is the difference of mean
activations between imperative prompts ("Write ...") and questions ("How ...?"); a logistic probe
for the same contrast, fitted on train prompts and scored on held-out ones, says how readable form
is at the site. The cosine of the form direction with the refusal direction (bootstrap 95% interval
over prompts) says how much of the refusal direction is that cue: near zero is what a model that
refuses harm rather than phrasing should show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from engine.data.prompt_forms import sentence_type
from engine.directions.extraction import unit


@dataclass(frozen=True)
class FormProbe:
    n_imperative: int
    n_question: int
    probe_accuracy: float  # balanced accuracy on held-out benign prompts (chance 0.5)
    cosine_with_refusal: float  # form direction (imperative - question) vs the refusal direction
    ci_low: float
    ci_high: float

    def row(self) -> dict[str, float | int]:
        return asdict(self)


def form_probe(activations: np.ndarray, texts: Sequence[str], benign: np.ndarray, fit: np.ndarray,
               refusal_direction: np.ndarray, *, n_boot: int, seed: int) -> FormProbe:
    """`activations` [n, d] at one site; `benign` and `fit` row masks (the form direction and probe are
    fitted on benign & fit rows, the probe scored on benign & ~fit rows)."""
    form = np.array([sentence_type(text) for text in texts])
    imperative, question = benign & (form == "imperative"), benign & (form == "question")
    target = unit(refusal_direction)
    fit_imp, fit_q = np.flatnonzero(imperative & fit), np.flatnonzero(question & fit)

    def cosine(imp_rows: np.ndarray, q_rows: np.ndarray) -> float:
        return float(unit(activations[imp_rows].mean(axis=0) - activations[q_rows].mean(axis=0)) @ target)

    rng = np.random.default_rng(seed)
    draws = [cosine(rng.choice(fit_imp, len(fit_imp)), rng.choice(fit_q, len(fit_q))) for _ in range(n_boot)]
    low, high = np.percentile(draws, [2.5, 97.5])
    rows = imperative | question
    train, held = rows & fit, rows & ~fit
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit(activations[train], imperative[train])
    predicted = probe.predict(activations[held])
    truth = imperative[held]
    accuracy = 0.5 * (predicted[truth].mean() + (~predicted[~truth]).mean())
    return FormProbe(n_imperative=int(imperative.sum()), n_question=int(question.sum()),
                     probe_accuracy=float(accuracy), cosine_with_refusal=cosine(fit_imp, fit_q),
                     ci_low=float(low), ci_high=float(high))

