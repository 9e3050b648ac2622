"""The verdict: is refusal one shared circuit or one per harm category?

A kind's categories are their prompts' node-effect vectors (SAE features only; error nodes are kept
apart). Every statistic here is a function of inner products between prompts, so the prompts are
held as one compact factor L with L @ L.T equal to their Gram matrix (exact, at most as many columns
as prompts): the rule costs the same at 4,600 nodes as at 50, and the calibration
(`engine.circuits.calibration`) can run it hundreds of times.

- `ratio_interval`: a joint bootstrap over prompts. Each draw resamples every category's prompts
  with replacement and recomputes from that one draw the between-category similarity (mean pairwise
  cosine of the category means), the within-category ceiling (each category's reliability: the mean
  product of two different prompts' effects over the squared norm of their mean, which is what a
  split-half cosine, Spearman-Brown corrected, estimates, here over all splits at once; averaged over
  categories) and their ratio, so the ratio's percentile interval carries the ceiling's uncertainty
  too. From the same draws: the category-specific share of the mean effect (energy of the centred
  category means over total energy, each corrected for noise), the planted q of the calibration.
- `structure_p`: permutation test of "category labels do not matter", on the between-category sum
  of squares (centred: it sees category tails however large the shared component);
  `pairwise_p`: the same for every pair of categories, Holm-corrected (statsmodels).
- `decide`: monolithic only when the ratio's whole interval lies at or above the monolithic band
  (sameness shown, not assumed); modular only when it lies below the modular band and the
  permutation test rejects; partially modular when it lies inside the middle band; otherwise
  inconclusive, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise
from typing import cast

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from engine.circuits.similarity import check_sample_size
from engine.errors import ExplorerError

LABELS = ("monolithic", "partially modular", "modular", "inconclusive")
PERMUTATION_BATCH_FLOATS = 20_000_000  # bounds one batch of permuted group sums in memory


@dataclass(frozen=True)
class Grouped:
    """A kind's prompts in category order, as a factor of their Gram matrix."""

    factor: np.ndarray  # [n_prompts, rank]: factor @ factor.T == effects @ effects.T
    sizes: tuple[int, ...]  # prompts per category

    @property
    def labels(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.sizes)), self.sizes)

    def rows(self, category: int) -> np.ndarray:
        start = sum(self.sizes[:category])
        return self.factor[start : start + self.sizes[category]]

    def blocks(self) -> np.ndarray:
        """[K, n_max, K, n_max]: the Gram matrix by category, zero-padded to the largest category."""
        n_max = max(self.sizes)
        padded = np.zeros((len(self.sizes), n_max, self.factor.shape[1]))
        for k, n in enumerate(self.sizes):
            padded[k, :n] = self.rows(k)
        return np.einsum("kid,jld->kijl", padded, padded, optimize=True)


def grouped(groups: Sequence[np.ndarray], *, min_prompts: int = 4) -> Grouped:
    """The categories' effect matrices [n_k, n_nodes] as one compact factor."""
    if len(groups) < 2:
        raise ExplorerError("A verdict needs at least two categories.", "compare two or more categories.")
    for k, group in enumerate(groups):
        check_sample_size(f"Category {k}", len(group), min_prompts)
    pooled = np.concatenate(groups).astype(np.float64)
    if pooled.shape[1] > pooled.shape[0]:
        # X.T = Q R, so X @ X.T = R.T @ R. mode="r" returns R alone (numpy's stubs say QRResult).
        pooled = cast(np.ndarray, np.linalg.qr(pooled.T, mode="r")).T
    return Grouped(np.ascontiguousarray(pooled), tuple(len(group) for group in groups))


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class RatioInterval:
    """The joint bootstrap's estimates. Only the ratio and the category share get intervals: both are
    free of noise bias, and each draw (whose category means carry the sample's noise and the
    resampling's) matches its numerator's attenuation with its denominator's, so their percentile
    intervals cover the truth (tested). Cosines and reliabilities on their own shrink with noise, and
    more so in a resample, so their percentile intervals would not be intervals of anything."""

    between: float  # mean pairwise cosine of the category means (shrunk by noise)
    ceiling: float  # mean within-category reliability: what `between` would be if categories were alike
    ratio: Estimate  # between / ceiling
    category_share: Estimate  # share of the mean effect's energy that is category-specific
    centred_between: float  # mean pairwise cosine of the centred category means
    centred_within: float  # mean reliability of the centred means: how reproducible category tails are
    centred_reliability: np.ndarray  # [K] that reliability per category
    pairs: pd.DataFrame  # a, b (category indices), cosine, centred_cosine
    n_boot: int
    confidence: float


def _counts(sizes: Sequence[int], n_draws: int, rng: np.random.Generator | None) -> np.ndarray:
    """[n_draws, K, n_max]: how often each prompt of each category is drawn (with replacement,
    within its category); without `rng`, the sample itself."""
    n_max = max(sizes)
    counts = np.zeros((n_draws, len(sizes), n_max))
    offsets = np.arange(n_draws)[:, None] * n_max
    for k, n in enumerate(sizes):
        if rng is None:
            counts[:, k, :n] = 1
        else:
            drawn = (rng.integers(0, n, (n_draws, n)) + offsets).ravel()
            counts[:, k] = np.bincount(drawn, minlength=n_draws * n_max).reshape(n_draws, n_max)
    return counts


def _cosines(gram: np.ndarray) -> np.ndarray:
    """[..., K, K] cosines from a [..., K, K] Gram matrix."""
    norms = np.sqrt(np.maximum(np.einsum("...kk->...k", gram), 1e-300))
    return gram / (norms[..., :, None] * norms[..., None, :])


def _centred(gram: np.ndarray) -> np.ndarray:
    """The Gram matrix of vectors minus their mean, from theirs: J G J with J = I - 11'/K."""
    k = gram.shape[-1]
    centring = np.eye(k) - 1 / k
    return centring @ gram @ centring


def _draw_statistics(blocks: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every statistic of `ratio_interval`, one value per draw (pair matrices [n_draws, K, K])."""
    n_draws, k, n_max = counts.shape
    # The category sums' Gram matrix [b, K, K], as one batched matrix product per category.
    left = np.matmul(counts.transpose(1, 0, 2), blocks.reshape(k, n_max, k * n_max)).reshape(k, n_draws, k, n_max)
    sums = (left * counts[None]).sum(-1).transpose(1, 0, 2)
    self_products = np.einsum("bki,ki->bk", counts**2, np.einsum("kiki->ki", blocks))
    n = counts.sum(-1)
    means = sums / (n[:, :, None] * n[:, None, :])
    squared = np.einsum("bkk->bk", means)
    # The mean product of two different prompts' effects: an unbiased ||true mean||^2. Resampled
    # copies of one prompt are not two prompts, so a draw's estimate targets the sample's truth, not the
    # resample's: its ceiling then shrinks with the sample's noise plus the resampling's, exactly as its
    # between-category cosines do, and their ratio stays centred on the true ratio.
    signal = (np.einsum("bkk->bk", sums) - self_products) / (n**2 - (counts**2).sum(-1))
    noise = squared - signal  # the sample mean's noise energy, ||mean||^2 - ||true mean||^2
    centred = _centred(means)
    centred_noise = (1 - 2 / k) * noise + noise.sum(-1, keepdims=True) / k**2
    upper = np.triu_indices(k, 1)
    cosine, centred_cosine = _cosines(means), _cosines(centred)
    between = cosine[:, upper[0], upper[1]].mean(-1)
    ceiling = (signal / squared).mean(-1)
    centred_reliability = 1 - centred_noise / np.einsum("bkk->bk", centred)
    return {
        "between": between, "ceiling": ceiling, "ratio": between / ceiling,
        "category_share": (np.trace(centred, axis1=1, axis2=2) - (1 - 1 / k) * noise.sum(-1)) / signal.sum(-1),
        "centred_between": centred_cosine[:, upper[0], upper[1]].mean(-1),
        "centred_within": centred_reliability.mean(-1), "centred_reliability": centred_reliability,
        "cosine": cosine, "centred_cosine": centred_cosine,
    }


def ratio_interval(data: Grouped, *, n_boot: int, seed: int, confidence: float = 0.95) -> RatioInterval:
    """Between-category similarity, the within-category ceiling, their ratio and the
    category-specific share, the last two with percentile intervals from one joint bootstrap over
    prompts (module docstring); point values from the sample itself."""
    blocks = data.blocks()
    # NaN, not a warning, for what is undefined: a draw of one prompt n times has no pair of prompts,
    # and categories with identical means have no centred vector.
    with np.errstate(invalid="ignore", divide="ignore"):
        point = _draw_statistics(blocks, _counts(data.sizes, 1, None))
        boot = _draw_statistics(blocks, _counts(data.sizes, n_boot, np.random.default_rng(seed)))
    tail = (1 - confidence) / 2

    def estimate(name: str) -> Estimate:
        # A draw that resamples one prompt over a whole category has no reliability; at 8 prompts,
        # one draw in 2 million.
        low, high = np.nanquantile(boot[name], [tail, 1 - tail])
        return Estimate(float(point[name][0]), float(low), float(high))

    a, b = np.triu_indices(len(data.sizes), 1)
    pairs = pd.DataFrame({"a": a, "b": b, "cosine": point["cosine"][0, a, b],
                          "centred_cosine": point["centred_cosine"][0, a, b]})
    return RatioInterval(float(point["between"][0]), float(point["ceiling"][0]), estimate("ratio"),
                         estimate("category_share"), float(point["centred_between"][0]),
                         float(point["centred_within"][0]), point["centred_reliability"][0], pairs, n_boot, confidence)


def structure_p(data: Grouped, *, n_permutations: int, seed: int) -> float:
    """p-value of "category labels do not matter": prompts are shuffled between categories (sizes
    kept); the statistic, sum_k ||category sum||^2 / n_k, is the between-category sum of squares plus
    a constant, large when category means differ in any direction."""
    n, rank = data.factor.shape

    def between(*samples: np.ndarray, axis: int = -1) -> np.ndarray | float:
        total: np.ndarray | float = 0.0  # a float for the unbatched (observed) samples
        for sample in samples:  # [batch, n_k] prompt indices
            members = np.zeros((*sample.shape[:-1], n))
            np.put_along_axis(members, sample, 1.0, axis=-1)
            total = total + ((members @ data.factor) ** 2).sum(-1) / sample.shape[-1]
        return total

    bounds = np.cumsum([0, *data.sizes])
    samples = [np.arange(start, end) for start, end in pairwise(bounds)]
    result = stats.permutation_test(
        samples, between, permutation_type="independent", vectorized=True, n_resamples=n_permutations,
        alternative="greater", batch=max(1, PERMUTATION_BATCH_FLOATS // (n * (rank + len(samples)))),
        rng=np.random.default_rng(seed))
    return float(result.pvalue)


def pairwise_p(data: Grouped, *, n_permutations: int, seed: int, method: str = "holm") -> pd.DataFrame:
    """`structure_p` for every pair of categories (a, b indices), and the p-values corrected for
    the number of pairs (`method`: a statsmodels multipletests method, Holm by default)."""
    rows = [{"a": a, "b": b, "p_value": structure_p(grouped([data.rows(a), data.rows(b)], min_prompts=2),
                                                    n_permutations=n_permutations, seed=seed)}
            for a, b in combinations(range(len(data.sizes)), 2)]
    table = pd.DataFrame(rows)
    table["p_corrected"] = multipletests(table["p_value"], method=method)[1]
    return table


@dataclass(frozen=True)
class Rule:
    """The decision rule's settings: bands on the ratio, the test's level, and its resampling."""

    alpha: float
    monolithic_ratio: float
    modular_ratio: float
    n_boot: int
    n_permutations: int
    confidence: float = 0.95


@dataclass(frozen=True)
class Decision:
    label: str
    reason: str
    interval: RatioInterval
    p_value: float


def decide(interval: RatioInterval, p_value: float, rule: Rule) -> tuple[str, str]:
    """The label and its reason (module docstring)."""
    low, high = interval.ratio.low, interval.ratio.high
    span = f"the ratio's {interval.confidence:.0%} interval ({low:.2f}–{high:.2f})"
    mono, mod = rule.monolithic_ratio, rule.modular_ratio
    test = f"permutation p = {p_value:.3g}"
    if not np.isfinite([low, high]).all():
        return "inconclusive", f"{span} is undefined: some category's circuit is not reliable over its prompts"
    if low >= mono:
        detail = (f"; category differences are detectable ({test}) but small" if p_value < rule.alpha
                  else f"; no category structure detected ({test})")
        return "monolithic", (f"{span} lies wholly at or above {mono:g}: the categories' circuits are shown to be "
                              f"at least {mono:.0%} as alike as two halves of one category{detail}")
    if high < mod and p_value < rule.alpha:
        return "modular", (f"{span} lies wholly below {mod:g} and category labels matter ({test} < {rule.alpha:g})")
    if high < mod:
        return "inconclusive", (f"{span} lies below {mod:g}, but the permutation test does not find category "
                                f"structure ({test} >= {rule.alpha:g})")
    if low >= mod and high < mono:
        return "partially modular", (f"{span} lies wholly between {mod:g} and {mono:g}: a shared part and "
                                     f"category-specific parts ({test})")
    return "inconclusive", f"{span} is too wide: it spans more than one verdict band ({mod:g} / {mono:g}; {test})"


def assess(data: Grouped, rule: Rule, *, seed: int) -> Decision:
    """The full decision on one kind's categories: joint bootstrap, permutation test, rule."""
    interval = ratio_interval(data, n_boot=rule.n_boot, seed=seed, confidence=rule.confidence)
    p_value = structure_p(data, n_permutations=rule.n_permutations, seed=seed)
    return Decision(*decide(interval, p_value, rule), interval, p_value)
