"""Comparing circuits: descriptive similarity between harm categories' circuits.

A circuit here is its per-prompt node effects, [n_prompts, n_nodes]; its node set is its top `size`
nodes by |mean effect|. Two circuits are compared by the Jaccard overlap of their node sets and
the cosine of their mean effect vectors, with percentile bootstrap CIs over prompts. A circuit's
reliability (the ceiling a between-category similarity can reach with this many prompts) is what
its split-half cosine, Spearman-Brown corrected, estimates. SAE error nodes are left out of the
compared vectors by the caller; `error_share` reports how much of a circuit they carry. The decision
rule built on these is `engine.circuits.verdict`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations
from typing import TypeVar

import numpy as np
import pandas as pd

from engine.errors import ExplorerError

Key = TypeVar("Key", bound=Hashable)  # what names a circuit: a category, a (kind, category) pair, ...


def ranked_nodes(mean_effects: np.ndarray, *, threshold: float = 0.0, max_nodes: int | None = None) -> np.ndarray:
    """Node indices by decreasing |effect|, those at or above `threshold`, at most `max_nodes`."""
    order = np.argsort(-np.abs(mean_effects), kind="stable")
    order = order[np.abs(mean_effects[order]) >= threshold] if threshold > 0 else order
    return order if max_nodes is None else order[:max_nodes]


def jaccard(a: Iterable[Hashable], b: Iterable[Hashable]) -> float:
    """|a & b| / |a | b| (NaN when both are empty)."""
    set_a, set_b = set(a), set(b)
    return len(set_a & set_b) / len(set_a | set_b) if set_a | set_b else float("nan")


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


def pairwise_similarity(circuits: Mapping[Key, np.ndarray], size: int, *, n_boot: int, seed: int,
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


@dataclass(frozen=True)
class SplitHalf:
    cosine: float  # mean cosine between the two halves' mean effects
    jaccard: float  # mean Jaccard of the two halves' top node sets


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
    return SplitHalf(float(np.mean(cosines)), float(np.mean(jaccards)))


def reliability(effects: np.ndarray) -> float:
    """How reproducible a circuit's mean effect is over its prompts: the mean product of two
    different prompts' effects (an unbiased ||true mean||^2) over ||sample mean||^2. The split-half
    cosine, Spearman-Brown corrected, estimates the same, here without the randomness of one split."""
    check_sample_size("A reliability estimate", len(effects), 2)
    effects = effects.astype(np.float64)
    n, total = len(effects), effects.sum(0)
    distinct = (total @ total - (effects**2).sum()) / (n * (n - 1))
    return float(distinct / ((total @ total) / n**2))


def error_share(mean_effects: np.ndarray, is_error: np.ndarray) -> float:
    """The SAE error nodes' share of a circuit's summed |mean effect|."""
    total = np.abs(mean_effects).sum()
    return float(np.abs(mean_effects[is_error]).sum() / total) if total > 0 else float("nan")


def shared_core(node_sets: Mapping[Key, Iterable[int]], min_share: float) -> pd.DataFrame:
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
