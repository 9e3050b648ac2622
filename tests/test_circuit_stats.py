"""Circuit comparison statistics on hand-made and synthetic circuits."""

from __future__ import annotations

import numpy as np
import pytest

from engine.circuits.similarity import (
    check_sample_size,
    cosine,
    error_share,
    jaccard,
    pairwise_similarity,
    ranked_nodes,
    reliability,
    seeds_label,
    shared_core,
    split_half,
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


def test_split_half_reliability_and_small_samples() -> None:
    rng = np.random.default_rng(1)
    steady = np.tile(np.arange(10.0), (20, 1)) + rng.normal(0, 1e-3, (20, 10))
    half = split_half(steady, size=3, n_splits=20, seed=0)
    assert half.cosine == pytest.approx(1.0, abs=1e-4) and half.jaccard == 1.0
    assert reliability(steady) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ExplorerError, match="has 3 prompt"):
        split_half(steady[:3], size=3, n_splits=2, seed=0)
    with pytest.raises(ExplorerError, match=r"toxic/self-harm has 2 prompt\(s\); its statistics need at least 8"):
        check_sample_size("toxic/self-harm", 2, 8)


def test_reliability_is_what_a_corrected_split_half_estimates() -> None:
    """Mean of 24 prompts = signal (||.||^2 = 50) + noise (||.||^2 per prompt 200, so 200/24 in the
    mean): the true reliability is 50 / (50 + 200/24) = 0.857. The estimate, the Spearman-Brown
    corrected split-half cosine and the truth agree on average over studies."""
    rng = np.random.default_rng(2)
    signal = rng.normal(size=200)
    signal *= np.sqrt(50 / (signal @ signal))
    studies = [signal + rng.normal(size=(24, 200)) for _ in range(200)]
    estimates = [reliability(study) for study in studies]
    halves = [split_half(study, size=5, n_splits=20, seed=i).cosine for i, study in enumerate(studies)]
    assert np.mean(estimates) == pytest.approx(50 / (50 + 200 / 24), abs=0.01)
    assert np.mean(estimates) == pytest.approx(np.mean([2 * c / (1 + c) for c in halves]), abs=0.01)
    by_hand = np.array([[1.0, 2.0], [3.0, 0.0], [2.0, 1.0]])  # distinct products 3, 4, 6; mean (2, 1)
    assert reliability(by_hand) == pytest.approx((13 / 3) / 5)


def test_error_share_by_hand() -> None:
    means = np.array([0.5, -1.0, 2.0, -0.5])
    assert error_share(means, np.array([False, True, False, True])) == pytest.approx(1.5 / 4)
    assert np.isnan(error_share(np.zeros(3), np.array([True, False, False])))


def test_shared_core_counts() -> None:
    core = shared_core({"a": [1, 2, 3], "b": [1, 2], "c": [1, 4]}, min_share=0.6)
    assert core.set_index("node")["n_circuits"].to_dict() == {1: 3, 2: 2, 3: 1, 4: 1}
    assert core.query("in_core")["node"].tolist() == [1, 2]
    assert core.set_index("node").loc[2, "share"] == pytest.approx(2 / 3)


def test_seeds_label_is_the_fixed_thresholds() -> None:
    assert [seeds_label(x) for x in (0.9, 0.8, 0.5, 0.2)] == ["monolithic", "partially modular", "modular",
                                                               "modular"]
