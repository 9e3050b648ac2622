"""Representational independence: a direction depends fully on itself, not on an orthogonal one, and
partly on a direction that shares half of it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from engine.data.prompt_sources import load_builtin
from engine.directions.independence import SiteDirection, dependence, independence_matrix
from tests.conftest import refusal_raising_directions


def test_dependence_is_the_share_of_induced_refusal_that_ablation_removes() -> None:
    assert dependence(np.array([2.0, 2.0]), np.array([0.5, 0.5])) == 0.75
    assert dependence(np.array([2.0]), np.array([2.0])) == 0.0
    assert np.isnan(dependence(np.array([0.0]), np.array([1.0])))


def test_planted_orthogonal_directions_are_independent_and_a_mixture_is_not(tiny_model, capsys) -> None:
    # Two orthogonal directions that each raise the refusal tokens' logits, and their 45-degree mixture.
    refusal_ids, a, b = refusal_raising_directions(tiny_model)
    mix = (a + b) / np.linalg.norm(a + b)
    directions = {name: SiteDirection(vector * 4.0, layer=1) for name, vector in (("a", a), ("b", b), ("mix", mix))}
    prompts = load_builtin().query("kind == 'safe'")["text"].head(24).tolist()
    matrix = independence_matrix(tiny_model, directions, prompts, refusal_ids, batch_size=32, n_boot=50)
    value = matrix.set_index(["a", "b"])["dependence"]
    assert (matrix["induced"] > 0.3).all()  # each direction induces refusal
    assert all(value[(name, name)] > 0.99 for name in directions)  # ablating a direction removes its own effect
    assert abs(value[("a", "b")]) < 0.1 and abs(value[("b", "a")]) < 0.1  # orthogonal: independent
    assert value[("mix", "a")] > 0.3 and value[("mix", "b")] > 0.3  # the mixture carries part of each
    assert (matrix["ci_low"] <= matrix["dependence"] + 1e-9).all() and (matrix["dependence"] <= matrix["ci_high"] + 1e-9).all()
    assert isinstance(matrix, pd.DataFrame) and len(matrix) == 9
    progress = capsys.readouterr().err  # one pass per steering: 1 baseline + 3 ablations + 3 additions + 9 pairs
    assert "independence: 100%" in progress and "16/16" in progress
