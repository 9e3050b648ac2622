"""Comparing circuits: is refusal one shared circuit, or one per harm category?

A circuit here is its per-prompt node effects, [n_prompts, n_nodes]; its node set is its top `size`
nodes by |mean effect|. Two circuits are compared by the Jaccard overlap of their node sets and
the cosine of their mean effect vectors, with percentile bootstrap CIs over prompts. The null
hypothesis "category labels do not matter" is tested by permuting the labels of the pooled prompts
(scipy.stats.permutation_test). Split-half similarity within one category is the ceiling a
between-category similarity can reach with this many prompts.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations, pairwise

import numpy as np
import pandas as pd
from scipy import stats

from engine.errors import ExplorerError


def ranked_nodes(mean_effects: np.ndarray, *, threshold: float = 0.0, max_nodes: int | None = None) -> np.ndarray:
    """Node indices by decreasing |effect|, those at or above `threshold`, at most `max_nodes`."""
    order = np.argsort(-np.abs(mean_effects), kind="stable")
    order = order[np.abs(mean_effects[order]) >= threshold] if threshold > 0 else order
    return order if max_nodes is None else order[:max_nodes]


def jaccard(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """|a & b| / |a | b| (NaN when both are empty)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else float("nan")


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    norms = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(u @ v) / norms if norms > 0 else float("nan")


def check_sample_size(name: str, n_prompts: int, minimum: int) -> None:
    if n_prompts < minimum:
        raise ExplorerError(f"{name} has {n_prompts} prompt(s); its statistics need at least {minimum}.",
                            "add prompts to it, or lower circuits.min_prompts in the config.")


def _top_mask(means: np.ndarray, size: int) -> np.ndarray:
    """Boolean [..., n_nodes]: the `size` largest |means| along the last axis."""
    top = np.argpartition(-np.abs(means), size - 1, axis=-1)[..., :size]
    mask = np.zeros(means.shape, dtype=bool)
    np.put_along_axis(mask, top, True, axis=-1)
    return mask


def bootstrap_means(effects: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n_nodes]: the mean over prompts resampled with replacement, n_boot times."""
    n = len(effects)
    counts = rng.multinomial(n, np.full(n, 1 / n), size=n_boot)
    return (counts @ effects) / n


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def pairwise_similarity(circuits: Mapping[Hashable, np.ndarray], size: int, *, n_boot: int, seed: int,
                        confidence: float = 0.95) -> pd.DataFrame:
    """Cosine and Jaccard (top-`size` node sets) for every pair of circuits, with bootstrap CIs.
    Rows: a, b (keys, a before b in `circuits` order), cosine, cosine_low, cosine_high, jaccard,
    jaccard_low, jaccard_high, n_a, n_b."""
    rng = np.random.default_rng(seed)
    keys = list(circuits)
    means = {key: circuits[key].mean(0) for key in keys}
    boots = {key: bootstrap_means(circuits[key], n_boot, rng) for key in keys}
    masks = {key: _top_mask(boots[key], size) for key in keys}
    tail = (1 - confidence) / 2
    rows = []
    for a, b in combinations(keys, 2):
        boot_cos = _row_cosines(boots[a], boots[b])
        boot_jac = (masks[a] & masks[b]).sum(1) / (masks[a] | masks[b]).sum(1)
        rows.append({
            "a": a, "b": b,
            "cosine": cosine(means[a], means[b]),
            "cosine_low": float(np.quantile(boot_cos, tail)), "cosine_high": float(np.quantile(boot_cos, 1 - tail)),
            "jaccard": jaccard(ranked_nodes(means[a], max_nodes=size), ranked_nodes(means[b], max_nodes=size)),
            "jaccard_low": float(np.quantile(boot_jac, tail)), "jaccard_high": float(np.quantile(boot_jac, 1 - tail)),
            "n_a": len(circuits[a]), "n_b": len(circuits[b]),
        })
    return pd.DataFrame(rows)


def _mean_pairwise_cosine(pooled: np.ndarray, groups: Sequence[np.ndarray]) -> float:
    means = np.stack([pooled[g].mean(0) for g in groups])
    unit = means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-30)
    similarity = unit @ unit.T
    return float(similarity[np.triu_indices(len(groups), 1)].mean())


def permutation_p(circuits: Sequence[np.ndarray], *, n_permutations: int, seed: int) -> float:
    """p-value of "the circuits are less alike than random relabellings of their prompts would
    be": the statistic is the mean pairwise cosine of the group means, and prompts are shuffled
    between groups keeping group sizes."""
    if len(circuits) < 2:
        raise ExplorerError("A permutation test needs at least two circuits.", "compare two or more categories.")
    pooled = np.concatenate(circuits)
    bounds = np.cumsum([0, *map(len, circuits)])
    samples = [np.arange(start, end) for start, end in pairwise(bounds)]
    result = stats.permutation_test(
        samples, lambda *groups: _mean_pairwise_cosine(pooled, groups), permutation_type="independent",
        vectorized=False, n_resamples=n_permutations, alternative="less", rng=np.random.default_rng(seed))
    return float(result.pvalue)


def spearman_brown(r: float | np.ndarray) -> float | np.ndarray:
    """Reliability of the full sample from that of a half: 2r / (1 + r)."""
    return 2 * r / (1 + r)


@dataclass(frozen=True)
class SplitHalf:
    cosine: float  # mean cosine between the two halves' mean effects
    jaccard: float  # mean Jaccard of the two halves' top node sets
    cosine_full: float  # cosine corrected to the full sample (Spearman-Brown): the ceiling


def split_half(effects: np.ndarray, size: int, *, n_splits: int, seed: int) -> SplitHalf:
    """Similarity of a circuit with itself over random halves of its prompts."""
    check_sample_size("A split-half comparison", len(effects), 4)
    rng = np.random.default_rng(seed)
    cosines, jaccards = [], []
    for _ in range(n_splits):
        order = rng.permutation(len(effects))
        first, second = effects[order[: len(order) // 2]].mean(0), effects[order[len(order) // 2 :]].mean(0)
        cosines.append(cosine(first, second))
        jaccards.append(jaccard(ranked_nodes(first, max_nodes=size), ranked_nodes(second, max_nodes=size)))
    mean_cosine = float(np.mean(cosines))
    return SplitHalf(mean_cosine, float(np.mean(jaccards)), float(spearman_brown(mean_cosine)))


def shared_core(node_sets: Mapping[Hashable, Sequence[int]], min_share: float) -> pd.DataFrame:
    """For every node in any set: in how many sets it is, that share, and whether it is in the
    core (in at least `min_share` of the sets). Sorted by count, most shared first."""
    counts = pd.Series([node for nodes in node_sets.values() for node in set(nodes)]).value_counts()
    table = counts.rename_axis("node").reset_index(name="n_circuits")
    table["share"] = table["n_circuits"] / len(node_sets)
    table["in_core"] = table["share"] >= min_share
    return table.sort_values(["n_circuits", "node"], ascending=[False, True], ignore_index=True)


SEED_BANDS = ((0.8, "monolithic"), (0.5, "partially modular"), (-np.inf, "modular"))


def seeds_label(mean_similarity: float) -> str:
    """The fixed thresholds of the project's seed notebooks: > 0.8, 0.5-0.8, < 0.5."""
    return next(label for bound, label in SEED_BANDS if mean_similarity > bound or bound == -np.inf)


@dataclass(frozen=True)
class Verdict:
    label: str  # monolithic / partially modular / modular
    reason: str
    between: float  # mean between-category cosine
    between_low: float
    between_high: float
    ceiling: float  # mean split-half cosine, corrected to full samples
    ratio: float  # between / ceiling
    ratio_low: float
    ratio_high: float
    p_value: float
    seeds_label: str  # the fixed-threshold label on the raw mean similarity, for comparison


def verdict(similarity: pd.DataFrame, ceiling: float, p_value: float, *, alpha: float, monolithic_ratio: float,
            modular_ratio: float) -> Verdict:
    """The verdict from the statistics: with no significant category structure (p >= alpha) or a
    between-category similarity within `monolithic_ratio` of the split-half ceiling, monolithic;
    below `modular_ratio` of it, modular; in between, partially modular. The CI of the mean cosine
    is the mean of the pairs' bootstrap bounds (conservative: pairs are not independent)."""
    between = float(similarity["cosine"].mean())
    low, high = float(similarity["cosine_low"].mean()), float(similarity["cosine_high"].mean())
    ratio = between / ceiling
    if p_value >= alpha:
        label = "monolithic"
        reason = (f"category labels change the circuit no more than random relabelling does "
                  f"(permutation p = {p_value:.3g} >= {alpha})")
    elif ratio >= monolithic_ratio:
        label = "monolithic"
        reason = (f"categories differ detectably (p = {p_value:.3g}) but their circuits are {ratio:.0%} as alike "
                  f"as two halves of one category (>= {monolithic_ratio:.0%})")
    elif ratio >= modular_ratio:
        label = "partially modular"
        reason = (f"categories differ (p = {p_value:.3g}) and their circuits are {ratio:.0%} as alike as two "
                  f"halves of one category ({modular_ratio:.0%}-{monolithic_ratio:.0%})")
    else:
        label = "modular"
        reason = (f"categories differ (p = {p_value:.3g}) and their circuits are only {ratio:.0%} as alike as two "
                  f"halves of one category (< {modular_ratio:.0%})")
    return Verdict(label, reason, between, low, high, ceiling, ratio, low / ceiling, high / ceiling, p_value,
                   seeds_label(between))
