"""The surface-form probe: finds a planted form direction and its alignment with a refusal direction."""

from __future__ import annotations

import numpy as np
import pytest

from engine.directions.form_probe import form_probe


def _planted(form_weight_on_refusal: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n, d = 400, 32
    texts = np.where(rng.random(n) < 0.5, "Write a poem", "How do tides work?")
    refusal = np.zeros(d)
    refusal[0] = 1.0
    form_axis = np.zeros(d)
    form_axis[1] = 1.0
    form_direction = form_weight_on_refusal * refusal + np.sqrt(1 - form_weight_on_refusal ** 2) * form_axis
    imperative = texts == "Write a poem"
    acts = rng.normal(size=(n, d)) + 3.0 * np.outer(imperative, form_direction)
    benign = np.ones(n, dtype=bool)
    fit = rng.random(n) < 0.6
    return acts, list(texts), benign, fit, refusal


@pytest.mark.parametrize("alignment", [0.0, 0.8])
def test_probe_reads_form_and_the_cosine_recovers_the_planted_alignment(alignment: float) -> None:
    acts, texts, benign, fit, refusal = _planted(alignment)
    result = form_probe(acts, texts, benign, fit, refusal, n_boot=200, seed=0)
    assert result.probe_accuracy > 0.9
    assert result.ci_low <= result.cosine_with_refusal <= result.ci_high
    assert abs(result.cosine_with_refusal - alignment) < 0.15
    assert result.ci_low - 0.05 < alignment < result.ci_high + 0.05
    assert result.n_imperative + result.n_question == len(texts)


def test_probe_is_at_chance_without_a_form_signal() -> None:
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(400, 32))
    texts = list(np.where(rng.random(400) < 0.5, "Write a poem", "How do tides work?"))
    result = form_probe(acts, texts, np.ones(400, dtype=bool), rng.random(400) < 0.6, np.eye(32)[0],
                        n_boot=50, seed=0)
    assert 0.35 < result.probe_accuracy < 0.65
