"""Refusal directions as differences of means, their selection, and their geometry.

Pure array functions: activations in, named results out. The model-facing parts (scoring a
candidate by intervening) live in engine.directions.scoring.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float
from sklearn.linear_model import LogisticRegression


def mean_difference(
    activations: Float[np.ndarray, " n *site"], harmful: Bool[np.ndarray, " n"], harmless: Bool[np.ndarray, " n"],
    *, block: int = 1024,
) -> Float[np.ndarray, "*site"]:
    """Mean over `harmful` rows minus mean over `harmless` rows: [n, ...] -> [...].

    Reads `activations` (an array or a disk-backed memmap) `block` rows at a time, so memory
    stays bounded by one block whatever the number of prompts.
    """
    if not harmful.any() or not harmless.any():
        raise ValueError("both prompt groups need at least one prompt")
    sums = [np.zeros(activations.shape[1:], dtype=np.float64) for _ in range(2)]
    for start in range(0, len(activations), block):
        chunk = np.asarray(activations[start : start + block], dtype=np.float64)
        for total, mask in zip(sums, (harmful, harmless)):
            total += chunk[mask[start : start + block]].sum(axis=0)
    return (sums[0] / harmful.sum() - sums[1] / harmless.sum()).astype(np.float32)


class GroupSums:
    """Running sums of activations [n, ...] over named groups of rows (boolean masks over the n
    rows; groups may overlap), filled like an array (`sums[rows] = values`, e.g. as
    `capture(out=...)`) without keeping any row: differences of means in memory that does not
    grow with the number of prompts. Counts are of the rows actually added, so shards' sums
    (`partial_sums`) merge into the right means whatever each shard's masks were."""

    def __init__(self, groups: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.masks = {name: np.asarray(mask, dtype=bool) for name, mask in groups.items()}
        self.totals = {name: np.zeros(shape[1:], dtype=np.float64) for name in groups}
        self.counts = dict.fromkeys(groups, 0)

    def __setitem__(self, rows: list[int], values: np.ndarray) -> None:
        for name, mask in self.masks.items():
            picked = mask[rows]
            if picked.any():
                self.totals[name] += values[picked].sum(axis=0, dtype=np.float64)
                self.counts[name] += int(picked.sum())

    def partial_sums(self) -> pd.DataFrame:
        """The totals as rows (group, cell, total, n), `cell` a flat index over the shape between the
        rows and the last axis, `n` the group's row count on its cell 0 (0 on the others, so any
        shards' rows sum to the count): one shard's part, added up by `add_partial_sums`."""
        return pd.concat([pd.DataFrame({"group": name, "cell": np.arange(len(flat)), "total": list(flat),
                                        "n": np.eye(1, len(flat), dtype=np.int64)[0] * self.counts[name]})
                          for name, total in self.totals.items()
                          for flat in [total.reshape(-1, self.shape[-1])]], ignore_index=True)

    def add_partial_sums(self, rows: pd.DataFrame) -> None:
        """Add `partial_sums` rows (of any number of shards) to the totals."""
        for label, group in rows.groupby("group"):
            name = cast(str, label)  # the totals' keys, as `partial_sums` wrote them
            flat = self.totals[name].reshape(-1, self.shape[-1])  # a view: added in place
            np.add.at(flat, group["cell"].to_numpy(), np.stack(group["total"].to_numpy()).astype(np.float64))
            self.counts[name] += int(group["n"].sum())

    def mean_difference(self, harmful: str, harmless: str) -> np.ndarray:
        """Mean of group `harmful` minus mean of group `harmless`, as `mean_difference` gives it."""
        counts = [self.counts[name] for name in (harmful, harmless)]
        if not all(counts):
            raise ValueError("both prompt groups need at least one prompt")
        return (self.totals[harmful] / counts[0] - self.totals[harmless] / counts[1]).astype(np.float32)


def refusal_filter(toxic: Bool[np.ndarray, " n"], safe: Bool[np.ndarray, " n"],
                   scores: Float[np.ndarray, " n"]) -> Bool[np.ndarray, " n"]:
    """Arditi et al. (2024)'s filter of the prompts that fit and choose a direction: the toxic ones
    the model refuses (refusal score > 0) and the safe ones it does not (< 0). Unscored rows (NaN)
    are dropped."""
    with np.errstate(invalid="ignore"):
        return (toxic & (scores > 0)) | (safe & (scores < 0))


def unit(vectors: Float[np.ndarray, "*batch d"]) -> Float[np.ndarray, "*batch d"]:
    """Normalise along the last axis (zero vectors stay zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def cosine_matrix(directions: Float[np.ndarray, "k d"]) -> Float[np.ndarray, "k k"]:
    """Pairwise cosine similarity of [k, d] directions -> [k, k]."""
    normed = unit(directions)
    return normed @ normed.T


@dataclass(frozen=True)
class SelectionRule:
    """Arditi et al. 2024: discard candidates that disturb harmless behaviour (KL), that do not
    induce refusal when added, or that sit in the last layers; keep the best ablation score."""

    max_kl: float = 0.1
    min_induce_score: float = 0.0
    prune_last_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.max_kl <= 0 or not 0 <= self.prune_last_fraction < 1:
            raise ValueError("max_kl must be > 0 and prune_last_fraction in [0, 1)")


def select_candidate(candidates: pd.DataFrame, n_layers: int, rule: SelectionRule) -> pd.DataFrame:
    """Mark each candidate `eligible` (with the reason when not) and the `chosen` one.

    `candidates` has columns layer, position, ablation_score, induce_score, kl.
    """
    table = candidates.copy()
    max_layer = n_layers * (1 - rule.prune_last_fraction)
    reasons = np.select(
        [table["ablation_score"].isna(), table["layer"] >= max_layer, table["kl"] > rule.max_kl,
         table["induce_score"] < rule.min_induce_score],
        ["zero direction (same activation for every prompt)", f"in the last {rule.prune_last_fraction:.0%} of layers",
         f"KL > {rule.max_kl}", f"induce score < {rule.min_induce_score}"],
        default="",
    )
    table["rejected_because"] = reasons
    table["eligible"] = table["rejected_because"] == ""
    table["chosen"] = False
    eligible = table[table["eligible"]]
    if not eligible.empty:
        table.loc[eligible["ablation_score"].idxmin(), "chosen"] = True
    return table


def separation_sigma(projections: np.ndarray, harmful: np.ndarray, harmless: np.ndarray) -> float:
    """(mean harmful projection - mean harmless projection) / pooled standard deviation."""
    a, b = projections[harmful], projections[harmless]
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("inf")


def layer_separation(
    activations: np.ndarray, harmful: np.ndarray, fit: np.ndarray, held_out: np.ndarray
) -> pd.DataFrame:
    """Per layer, on held-out prompts: separation (sigma) along the fit split's mean-difference
    direction and the accuracy of a logistic-regression probe trained on the fit split.

    `activations` [n, n_layers, d] (array or memmap: one layer is read at a time); `harmful`
    labels rows (True toxic, False safe); `fit` and `held_out` are disjoint row masks, rows in
    neither are ignored.
    """
    rows = []
    for layer in range(activations.shape[1]):
        x = np.asarray(activations[:, layer, :])
        direction = unit(mean_difference(x[fit], harmful[fit], ~harmful[fit]))
        projections = x[held_out] @ direction
        probe = LogisticRegression(max_iter=2000, C=1.0).fit(x[fit], harmful[fit])
        rows.append({
            "layer": layer,
            "separation_sigma": separation_sigma(projections, harmful[held_out], ~harmful[held_out]),
            "probe_accuracy": float(probe.score(x[held_out], harmful[held_out])),
        })
    return pd.DataFrame(rows)


def bootstrap_cosines(
    activations: np.ndarray,
    groups: np.ndarray,
    names: list[str],
    baseline: np.ndarray,
    *,
    n_boot: int,
    seed: int,
    remove: np.ndarray | None = None,
) -> pd.DataFrame:
    """Cosine between every two groups' directions (group mean minus baseline mean), with a
    percentile 95% bootstrap interval from resampling prompts within each group and baseline.

    `activations` [n, d]; `groups` [n] holds a name from `names` or anything else; `baseline` is
    a row mask (the safe prompts). `remove` [d]: a direction (e.g. the global refusal direction,
    held fixed) projected out of every group direction first, so the cosines show what the
    categories share beyond it.
    """
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(groups == name) for name in names]
    base_rows = np.flatnonzero(baseline)
    removed = None if remove is None else unit(np.asarray(remove, dtype=np.float64))

    def directions(pick) -> np.ndarray:
        base_mean = activations[pick(base_rows)].mean(axis=0)
        stacked = np.stack([activations[pick(rows)].mean(axis=0) - base_mean for rows in members])
        return stacked if removed is None else stacked - np.outer(stacked @ removed, removed)

    point = cosine_matrix(directions(lambda rows: rows))
    draws = np.stack([
        cosine_matrix(directions(lambda rows: rng.choice(rows, size=len(rows), replace=True)))
        for _ in range(n_boot)
    ])
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    return pd.DataFrame([
        {"category_a": a, "category_b": b, "cosine": float(point[i, j]),
         "ci_low": float(low[i, j]), "ci_high": float(high[i, j])}
        for i, a in enumerate(names) for j, b in enumerate(names)
    ])


@dataclass(frozen=True)
class Specificity:
    """Does ablating a category's own direction cut its refusal more than other categories' do?"""

    own_drop: float  # mean drop in refusal score with the prompt's own category direction ablated
    other_drop: float  # mean drop with another category's direction ablated (averaged over them)
    difference: float  # own - other, per prompt then averaged: 0 = interchangeable directions
    ci_low: float
    ci_high: float
    n_prompts: int


def cross_ablation_specificity(scores: pd.DataFrame, categories: list[str], *, n_boot: int,
                               seed: int) -> Specificity:
    """From per-prompt refusal scores under each ablation (`scores`: prompt_id, category, ablated,
    score; `ablated` "none" for the unablated score and a category name for its direction), the
    diagonal-minus-off-diagonal effect of cross-ablation, paired per prompt, with a percentile 95%
    bootstrap interval over prompts (NaN with fewer than two categories)."""
    if len(categories) < 2:
        return Specificity(np.nan, np.nan, np.nan, np.nan, np.nan, 0)
    wide = scores.pivot_table(index=["prompt_id", "category"], columns="ablated", values="score").reset_index()
    wide = wide[wide["category"].isin(categories)]
    drops = wide["none"].to_numpy()[:, None] - wide[categories].to_numpy()  # [n_prompts, n_categories]
    own_column = wide["category"].map({c: i for i, c in enumerate(categories)}).to_numpy()
    own = drops[np.arange(len(drops)), own_column]
    other = (drops.sum(1) - own) / (len(categories) - 1)
    difference = own - other
    rng = np.random.default_rng(seed)
    draws = [difference[rng.integers(0, len(difference), len(difference))].mean() for _ in range(n_boot)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return Specificity(float(own.mean()), float(other.mean()), float(difference.mean()), float(low), float(high),
                       len(difference))


def hard_prompt_direction(acts: np.ndarray, hard_refused: np.ndarray, hard_answered: np.ndarray,
                           global_direction: np.ndarray, *, n_boot: int, seed: int) -> dict[str, Any]:
    """Refused-minus-answered hard prompts' direction and its cosine with the global one."""
    row: dict[str, Any] = {"n_refused": int(hard_refused.sum()), "n_answered": int(hard_answered.sum())}
    if min(row["n_refused"], row["n_answered"]) < 3:
        return row | {"cosine_with_global": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                      "note": "fewer than 3 hard prompts in one group"}
    rng = np.random.default_rng(seed)
    target = unit(global_direction)
    refused_rows, answered_rows = np.flatnonzero(hard_refused), np.flatnonzero(hard_answered)

    def cosine(a_rows, b_rows) -> float:
        return float(unit(acts[a_rows].mean(0) - acts[b_rows].mean(0)) @ target)

    draws = [cosine(rng.choice(refused_rows, len(refused_rows)), rng.choice(answered_rows, len(answered_rows)))
             for _ in range(n_boot)]
    low, high = np.percentile(draws, [2.5, 97.5])
    return row | {"cosine_with_global": cosine(refused_rows, answered_rows), "ci_low": float(low),
                  "ci_high": float(high), "note": ""}
