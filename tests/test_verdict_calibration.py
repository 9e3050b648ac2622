"""The verdict rule, category decodability and the planted-effect calibration, on simulated studies
whose answer is known. Sizes are stated per test; they are smaller than the demo's (10 categories x
24 prompts x ~4,600 nodes) where the property still holds, so that each test takes seconds."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import NearestCentroid
from statsmodels.stats.multitest import multipletests

from engine.circuits.calibration import (
    calibrate,
    decisive_scale,
    planted_study,
    smallest_detectable_share,
    truth,
)
from engine.circuits.decodability import category_decodability
from engine.circuits.verdict import (
    Estimate,
    RatioInterval,
    Rule,
    assess,
    decide,
    grouped,
    pairwise_p,
    ratio_interval,
    structure_p,
)
from engine.errors import ExplorerError

RULE = Rule(alpha=0.05, monolithic_ratio=0.8, modular_ratio=0.5, n_boot=200, n_permutations=199)


def _means(rng: np.random.Generator, share: float, n_categories: int, n_nodes: int) -> np.ndarray:
    """[K, n_nodes] true category means: a heavy-tailed shared vector and category tails on random
    other nodes, with `share` of the energy category-specific (built here independently of
    engine.circuits.calibration)."""
    shared = rng.standard_t(3, n_nodes)
    tails = np.zeros((n_categories, n_nodes))
    for k in range(n_categories):
        own = rng.choice(n_nodes, n_nodes // 20, replace=False)
        tails[k, own] = rng.standard_t(3, len(own))
    tails -= tails.mean(0)
    tails -= np.outer(tails @ shared / (shared @ shared), shared)
    tails *= np.sqrt(n_categories * (shared @ shared) / (tails**2).sum())
    return np.sqrt(1 - share) * shared + np.sqrt(share) * tails


def _study(rng: np.random.Generator, means: np.ndarray, n: int, noise: float) -> list[np.ndarray]:
    return [mean + noise * rng.standard_normal((n, means.shape[1])) for mean in means]


def _true_ratio(means: np.ndarray) -> float:
    unit = means / np.linalg.norm(means, axis=1, keepdims=True)
    return float((unit @ unit.T)[np.triu_indices(len(means), 1)].mean())


def test_grouped_keeps_every_inner_product_and_needs_enough_prompts() -> None:
    rng = np.random.default_rng(0)
    groups = [rng.normal(size=(5, 40)), rng.normal(size=(6, 40))]
    data = grouped(groups)
    pooled = np.concatenate(groups)
    assert data.factor.shape == (11, 11) and data.sizes == (5, 6)
    np.testing.assert_allclose(data.factor @ data.factor.T, pooled @ pooled.T, atol=1e-10)
    assert data.labels.tolist() == [0] * 5 + [1] * 6
    blocks = data.blocks()
    np.testing.assert_allclose(blocks[1, :6, 0, :5], pooled[5:] @ pooled[:5].T, atol=1e-10)
    assert (blocks[0, 5] == 0).all()  # padding
    with pytest.raises(ExplorerError, match="at least two categories"):
        grouped(groups[:1])
    with pytest.raises(ExplorerError, match="Category 1 has 3 prompt"):
        grouped([groups[0], groups[1][:3]])


def test_ratio_interval_on_noise_free_categories_is_their_mean_cosine() -> None:
    """Every prompt of a category is its mean: ceiling 1, ratio = mean pairwise cosine exactly (also
    in draws that resample one prompt over a whole category, whose reliability is undefined)."""
    means = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    interval = ratio_interval(grouped([np.tile(m, (4, 1)) for m in means]), n_boot=200, seed=0)
    expected = np.mean([1 / np.sqrt(2), 1 / np.sqrt(2), 0.5])
    assert interval.ceiling == pytest.approx(1.0)
    assert interval.ratio.value == pytest.approx(expected) and interval.between == pytest.approx(expected)
    assert (interval.ratio.low, interval.ratio.high) == pytest.approx((expected, expected))
    centred = means - means.mean(0)
    assert interval.category_share.value == pytest.approx((centred**2).sum() / (means**2).sum())
    pair = interval.pairs.set_index(["a", "b"]).loc[(1, 2)]
    assert pair["cosine"] == pytest.approx(0.5)
    assert pair["centred_cosine"] == pytest.approx(centred[1] @ centred[2] / np.linalg.norm(centred[1]) ** 2)


@pytest.mark.parametrize("share", [0.0, 0.3, 0.6])
def test_joint_bootstrap_interval_covers_the_true_ratio(share: float) -> None:
    """60 studies of 6 categories x 12 prompts x 300 nodes, noise giving a within-category ceiling of
    about 0.55 (the ratio halves what the raw cosine shows): the ratio's 95% interval covers the true
    ratio in >= 90% of them, and so does the category share's interval the planted share."""
    rng = np.random.default_rng(1)
    covered, share_covered, ceilings = 0, 0, []
    for study in range(60):
        means = _means(rng, share, 6, 300)
        interval = ratio_interval(grouped(_study(rng, means, 12, 5.5)), n_boot=200, seed=study)
        covered += interval.ratio.low <= _true_ratio(means) <= interval.ratio.high
        share_covered += interval.category_share.low <= share <= interval.category_share.high
        ceilings.append(interval.ceiling)
    assert 0.4 < np.mean(ceilings) < 0.7
    assert covered / 60 >= 0.9 and share_covered / 60 >= 0.9


def test_structure_p_is_uniform_without_categories_and_small_with_them() -> None:
    """5 categories x 10 prompts x 40 nodes, a large shared effect on every prompt."""
    rng = np.random.default_rng(2)
    shared = 3 * rng.normal(size=40)

    def study(tail: float) -> list[np.ndarray]:
        groups = [shared + rng.normal(size=(10, 40)) for _ in range(5)]
        for k, group in enumerate(groups):
            group[:, k] += tail  # each category's own node
        return groups

    null = [structure_p(grouped(study(0.0)), n_permutations=99, seed=i) for i in range(80)]
    assert stats.kstest(null, "uniform").pvalue > 0.01 and np.mean(np.array(null) < 0.05) <= 0.12
    assert structure_p(grouped(study(1.5)), n_permutations=199, seed=0) <= 0.01


def test_pairwise_p_values_are_holm_corrected() -> None:
    rng = np.random.default_rng(3)
    groups = [rng.normal(size=(8, 30)) for _ in range(4)]
    groups[0][:, 0] += 4.0  # category 0 differs from every other
    table = pairwise_p(grouped(groups), n_permutations=499, seed=0)
    assert list(zip(table["a"], table["b"], strict=True)) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    np.testing.assert_allclose(table["p_corrected"], multipletests(table["p_value"], method="holm")[1])
    assert (table["p_corrected"] >= table["p_value"]).all()
    assert (table.loc[table["a"] == 0, "p_corrected"] < 0.05).all()


def _interval(low: float, high: float) -> RatioInterval:
    return RatioInterval(0.5, 0.7, Estimate((low + high) / 2, low, high), Estimate(0.1, 0.0, 0.2), -0.2, 0.1,
                         np.zeros(3), pd.DataFrame(), 200, 0.95)


@pytest.mark.parametrize(("low", "high", "p", "label", "words"), [
    (0.85, 1.05, 0.40, "monolithic", "no category structure detected"),
    (0.80, 0.95, 0.01, "monolithic", "detectable (permutation p = 0.01) but small"),
    (0.55, 0.75, 0.01, "partially modular", "wholly between 0.5 and 0.8"),
    (0.10, 0.45, 0.01, "modular", "wholly below 0.5 and category labels matter"),
    (0.10, 0.45, 0.30, "inconclusive", "does not find category structure"),
    (0.60, 1.10, 0.40, "inconclusive", "too wide"),
    (0.30, 0.70, 0.01, "inconclusive", "too wide"),
    (0.79, 1.00, 0.40, "inconclusive", "too wide"),
])
def test_decide_shows_sameness_instead_of_assuming_it(low, high, p, label, words) -> None:
    """A non-significant test alone never makes "monolithic": the whole interval must clear the band."""
    decided, reason = decide(_interval(low, high), p, RULE)
    assert decided == label and words in reason and f"({low:.2f}–{high:.2f})" in reason


def test_centred_similarity_sees_category_tails_the_cosine_misses() -> None:
    """8 categories x 16 prompts x 400 nodes; tails carry 3% of the energy. The uncentred cosine
    barely moves (both studies' categories are over 0.9 alike, and the ratio's whole interval is in
    the monolithic band for both); the centred category means are reproducible with tails and not
    without, and the category share's interval separates the two studies."""
    rng = np.random.default_rng(4)
    with_tails = ratio_interval(grouped(_study(rng, _means(rng, 0.03, 8, 400), 16, 0.5)), n_boot=200, seed=0)
    without = ratio_interval(grouped(_study(rng, _means(rng, 0.0, 8, 400), 16, 0.5)), n_boot=200, seed=0)
    for interval in (with_tails, without):
        assert interval.ratio.low >= RULE.monolithic_ratio and interval.between > 0.9
    assert abs(with_tails.between - without.between) < 0.05
    assert with_tails.centred_within > 0.8 and abs(without.centred_within) < 0.15
    assert with_tails.category_share.low > 0.01 and without.category_share.low <= 0 <= without.category_share.high
    assert with_tails.centred_between == pytest.approx(-1 / 7, abs=0.05)  # tails on different nodes


def test_decodability_at_chance_without_categories_and_high_with_them() -> None:
    """6 categories x 12 prompts x 200 nodes."""
    rng = np.random.default_rng(5)
    flat = category_decodability(grouped(_study(rng, _means(rng, 0.0, 6, 200), 12, 1.0)), folds=4,
                                 n_permutations=199, seed=0)
    assert flat.chance == pytest.approx(1 / 6) and flat.p_value > 0.05 and flat.accuracy < flat.null_high + 0.05
    assert flat.null_mean == pytest.approx(1 / 6, abs=0.05)
    planted = category_decodability(grouped(_study(rng, _means(rng, 0.5, 6, 200), 12, 1.0)), folds=4,
                                    n_permutations=199, seed=0)
    assert planted.accuracy >= 0.9 and planted.p_value == pytest.approx(1 / 200)


def test_decodability_is_scikit_learns_nearest_centroid() -> None:
    rng = np.random.default_rng(6)
    groups = _study(rng, _means(rng, 0.2, 4, 60), 9, 3.0)
    pooled, labels = np.concatenate(groups), np.repeat(np.arange(4), 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NearestCentroid warns about features constant within a class
        predicted = cross_val_predict(NearestCentroid(), pooled, labels,
                                      cv=StratifiedKFold(3, shuffle=True, random_state=7))
    ours = category_decodability(grouped(groups), folds=3, n_permutations=19, seed=7)
    assert ours.accuracy == pytest.approx((predicted == labels).mean())
    assert 0.3 < ours.accuracy < 1  # neither trivial nor perfect: the comparison means something


def test_planted_study_plants_exactly_the_share_asked_for() -> None:
    rng = np.random.default_rng(8)
    groups = _study(rng, _means(rng, 0.2, 5, 120), 10, 1.0)
    study = planted_study(groups, seed=0)
    assert study.sizes == (10,) * 5 and study.residuals.shape == (50, study.shared.shape[0])
    pooled_residuals = np.concatenate([g - g.mean(0) for g in groups]) * np.sqrt(10 / 9)
    assert np.linalg.norm(study.residuals) == pytest.approx(np.linalg.norm(pooled_residuals))
    for share in (0.0, 0.35, 1.0):
        means = study.means(share)
        centred = means - means.mean(0)
        assert (centred**2).sum() / (means**2).sum() == pytest.approx(share, abs=1e-9)
        assert study.true_ratio(share) == pytest.approx(_true_ratio(means))
    assert study.true_ratio(0.0) == pytest.approx(1.0) and truth(study.true_ratio(0.6), RULE) == "modular"
    simulated = study.simulate(0.35, rng, scale=2)
    assert simulated.sizes == (20,) * 5
    with pytest.raises(ExplorerError, match="all zero"):
        planted_study([np.zeros((4, 6)), np.zeros((4, 6))], seed=0)


def test_calibration_keeps_quiet_at_zero_and_finds_large_shares() -> None:
    """A study of 5 categories x 12 prompts x 300 nodes (ceiling about 0.5), 40 simulations per share:
    the rule says "modular" in at most 5% of q = 0 simulations and in at least 80% at the grid's
    largest q; the smallest detectable share is read off the curve."""
    rng = np.random.default_rng(9)
    study = planted_study(_study(rng, _means(rng, 0.0, 5, 300), 12, 2.0), seed=0)
    rule = Rule(alpha=0.05, monolithic_ratio=0.8, modular_ratio=0.5, n_boot=100, n_permutations=99)
    table = calibrate(study, rule, shares=(0.0, 0.3, 0.8), n_simulations=40, seed=0)
    at = table.set_index("share")
    assert at.loc[0.0, "modular"] <= 0.05 and at.loc[0.8, "modular"] >= 0.8
    assert at.loc[0.0, "truth"] == "monolithic" and at.loc[0.8, "truth"] == "modular"
    assert at.loc[0.0, "rejected"] <= 0.125  # the permutation test's level, within Monte Carlo error
    label_columns = ["monolithic", "partially_modular", "modular", "inconclusive"]
    np.testing.assert_allclose(table[label_columns].sum(1), 1.0)
    assert at.loc[0.8, "share_estimate_median"] == pytest.approx(0.8, abs=0.1)
    assert smallest_detectable_share(table) == table.loc[table["detected"] >= 0.8, "share"].min()
    assert np.isnan(smallest_detectable_share(table.assign(detected=0.0)))


def test_more_prompts_decide_an_inconclusive_share() -> None:
    """At a share whose true ratio sits inside the middle band, 5 categories x 8 prompts are too few
    to place the interval; some multiple of them decides it, and the rows say which."""
    rng = np.random.default_rng(10)
    study = planted_study(_study(rng, _means(rng, 0.0, 5, 300), 8, 4.0), seed=0)
    rule = Rule(alpha=0.05, monolithic_ratio=0.8, modular_ratio=0.5, n_boot=100, n_permutations=99)
    first = assess(study.simulate(0.35, rng), rule, seed=0)
    assert first.label == "inconclusive"
    rows, scale = decisive_scale(study, rule, share=0.35, scales=(2, 4, 8), n_simulations=10, seed=0)
    assert scale in (2, 4, 8) and rows["scale"].tolist() == [s for s in (2, 4, 8) if s <= scale]
    assert rows.iloc[-1]["inconclusive"] <= 0.2 and rows.iloc[-1]["prompts_per_category"] == 8 * scale
