"""Circuit comparison statistics on hand-made and synthetic circuits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from engine.circuit_stats import (
    check_sample_size,
    cosine,
    jaccard,
    pairwise_similarity,
    permutation_p,
    ranked_nodes,
    seeds_label,
    shared_core,
    spearman_brown,
    split_half,
    verdict,
)
from engine.errors import ExplorerError


def test_jaccard_and_cosine_by_hand() -> None:
    assert jaccard([1, 2, 3], [2, 3, 4, 5]) == pytest.approx(2 / 5)
    assert jaccard([7], [7]) == 1.0 and jaccard([1], [2]) == 0.0
    assert np.isnan(jaccard([], []))
    assert cosine(np.array([1.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0])) == pytest.approx(0.5)
    assert cosine(np.array([1.0, 2.0]), np.array([-2.0, -4.0])) == pytest.approx(-1.0)
    assert np.isnan(cosine(np.zeros(2), np.ones(2)))


def test_ranked_nodes_order_threshold_and_size() -> None:
    effects = np.array([0.1, -3.0, 2.0, 0.0, -0.5])
    assert ranked_nodes(effects).tolist() == [1, 2, 4, 0, 3]
    assert ranked_nodes(effects, threshold=0.4).tolist() == [1, 2, 4]
    assert ranked_nodes(effects, threshold=0.4, max_nodes=2).tolist() == [1, 2]


def test_pairwise_similarity_on_hand_made_circuits() -> None:
    """Two circuits whose every prompt has the same effects: no bootstrap spread, exact values."""
    a = np.tile([3.0, 2.0, 1.0, 0.0, 0.0], (6, 1))
    b = np.tile([0.0, 2.0, 1.0, 3.0, 0.0], (5, 1))
    table = pairwise_similarity({"a": a, "b": b, "a2": a.copy()}, size=3, n_boot=50, seed=0)
    ab = table.set_index(["a", "b"]).loc[("a", "b")]
    assert ab["cosine"] == pytest.approx(5 / 14)  # (4 + 1) / (9 + 4 + 1)
    assert ab["jaccard"] == pytest.approx(2 / 4)  # {0,1,2} vs {1,2,3}
    assert ab["cosine_low"] == pytest.approx(5 / 14) and ab["cosine_high"] == pytest.approx(5 / 14)
    assert (ab["n_a"], ab["n_b"]) == (6, 5)
    same = table.set_index(["a", "b"]).loc[("a", "a2")]
    assert same["cosine"] == pytest.approx(1.0) and same["jaccard"] == 1.0
    assert len(table) == 3


def _groups(rng: np.random.Generator, planted: float, n_groups: int = 4, n: int = 12, nodes: int = 30):
    """Prompts share a common effect on nodes 0-4; group g adds `planted` on its own node 10+g."""
    groups = []
    for g in range(n_groups):
        effects = rng.normal(0, 1, (n, nodes))
        effects[:, :5] += 2.0
        effects[:, 10 + g] += planted
        groups.append(effects)
    return groups


def test_permutation_p_is_uniform_without_structure_and_small_with_it() -> None:
    rng = np.random.default_rng(0)
    null_p = [permutation_p(_groups(rng, 0.0), n_permutations=199, seed=i) for i in range(60)]
    assert stats.kstest(null_p, "uniform").pvalue > 0.01
    assert 0.0 <= np.mean(np.array(null_p) < 0.05) <= 0.15
    planted = permutation_p(_groups(rng, 4.0), n_permutations=199, seed=0)
    assert planted <= 0.01
    with pytest.raises(ExplorerError, match="at least two circuits"):
        permutation_p(_groups(rng, 0.0)[:1], n_permutations=9, seed=0)


def test_split_half_ceiling_and_small_samples() -> None:
    rng = np.random.default_rng(1)
    steady = np.tile(np.arange(10.0), (20, 1)) + rng.normal(0, 1e-3, (20, 10))
    half = split_half(steady, size=3, n_splits=20, seed=0)
    assert half.cosine == pytest.approx(1.0, abs=1e-4) and half.jaccard == 1.0
    assert spearman_brown(0.5) == pytest.approx(2 / 3)
    noisy = split_half(rng.normal(0, 1, (20, 10)), size=3, n_splits=20, seed=0)
    assert noisy.cosine < 0.6 and noisy.cosine_full == pytest.approx(spearman_brown(noisy.cosine))
    with pytest.raises(ExplorerError, match="has 3 prompt"):
        split_half(steady[:3], size=3, n_splits=2, seed=0)
    with pytest.raises(ExplorerError, match=r"toxic/self-harm has 2 prompt\(s\); its statistics need at least 8"):
        check_sample_size("toxic/self-harm", 2, 8)


def test_shared_core_counts() -> None:
    core = shared_core({"a": [1, 2, 3], "b": [1, 2], "c": [1, 4]}, min_share=0.6)
    assert core.set_index("node")["n_circuits"].to_dict() == {1: 3, 2: 2, 3: 1, 4: 1}
    assert core.query("in_core")["node"].tolist() == [1, 2]
    assert core.set_index("node").loc[2, "share"] == pytest.approx(2 / 3)


def test_verdict_follows_the_statistics_and_shows_the_seeds_label() -> None:
    table = pd.DataFrame({"cosine": [0.6, 0.7], "cosine_low": [0.5, 0.6], "cosine_high": [0.7, 0.8]})
    bands = {"alpha": 0.05, "monolithic_ratio": 0.8, "modular_ratio": 0.5}
    assert verdict(table, ceiling=0.7, p_value=0.2, **bands).label == "monolithic"  # no structure
    close = verdict(table, ceiling=0.75, p_value=0.001, **bands)
    assert close.label == "monolithic" and close.ratio == pytest.approx(0.65 / 0.75)
    assert verdict(table, ceiling=1.0, p_value=0.001, **bands).label == "partially modular"
    apart = verdict(table, ceiling=1.5, p_value=0.001, **bands)
    assert apart.label == "modular" and "only 43%" in apart.reason
    assert close.seeds_label == "partially modular"  # 0.65 falls in the seeds' 0.5-0.8 band
    assert close.between_low == pytest.approx(0.55) and close.ratio_high == pytest.approx(0.75 / 0.75)
    assert [seeds_label(x) for x in (0.9, 0.8, 0.5, 0.2)] == ["monolithic", "partially modular", "modular",
                                                               "modular"]
