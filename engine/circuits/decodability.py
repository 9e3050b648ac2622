"""Category decodability: can a prompt's harm category be read off its node effects?

It answers "do categories use distinguishable mechanisms?" directly: the cross-validated accuracy of
a linear classifier, the nearest category mean (scikit-learn's `NearestCentroid` rule, in the
node-effect space the similarities use), against chance and against the same classifier trained on
shuffled labels. The nearest-mean rule needs only inner products between prompts, so it runs on the
Gram matrix of `engine.circuits.verdict.Grouped`, every permutation at once: written out because
`permutation_test_score` refits one estimator per fold and permutation (16 s a kind at the demo's
size, against a fraction of a second here). Tests check it against scikit-learn's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

from engine.circuits.verdict import Grouped


@dataclass(frozen=True)
class Decodability:
    accuracy: float  # held-out accuracy over all prompts
    chance: float  # the largest category's share of prompts
    null_mean: float  # mean accuracy with shuffled labels
    null_high: float  # its 95th percentile
    p_value: float  # (1 + shuffles at least as accurate) / (1 + shuffles)
    folds: int
    n_permutations: int


def nearest_mean_accuracy(gram: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Held-out accuracy of the nearest-category-mean rule for each row of `labels` [n_labellings,
    n_prompts] (ints 0..K-1), with prompts in fold `folds[i]` predicted from the others."""
    n_categories = int(labels.max()) + 1
    correct = np.zeros(len(labels))
    for fold in np.unique(folds):
        test, train = folds == fold, folds != fold
        members = (labels[:, None, train] == np.arange(n_categories)[None, :, None]).astype(np.float64)
        sizes = members.sum(-1, keepdims=True)  # [b, K, 1]
        weights = members / np.maximum(sizes, 1)  # a row per category: its training mean's weights
        cross = weights @ gram[np.ix_(train, test)]  # [b, K, n_test]: mean . prompt
        centre = ((weights @ gram[np.ix_(train, train)]) * weights).sum(-1, keepdims=True)  # ||mean||^2
        distance = np.where(sizes > 0, centre - 2 * cross, np.inf)  # ||prompt - mean||^2 - ||prompt||^2
        correct += (distance.argmin(1) == labels[:, test]).sum(-1)
    return correct / labels.shape[1]


def category_decodability(data: Grouped, *, folds: int, n_permutations: int, seed: int) -> Decodability:
    """Cross-validated nearest-category-mean accuracy (stratified `folds`, at most the smallest
    category's size) and its label-permutation null (the folds kept, the labels shuffled)."""
    rng = np.random.default_rng(seed)
    labels = data.labels
    folds = min(folds, min(data.sizes))
    assignment = np.empty(len(labels), dtype=int)
    for fold, (_, test) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(labels, labels)):
        assignment[test] = fold
    gram = data.factor @ data.factor.T
    accuracy = nearest_mean_accuracy(gram, labels[None], assignment)[0]
    null = nearest_mean_accuracy(gram, rng.permuted(np.tile(labels, (n_permutations, 1)), axis=1), assignment)
    return Decodability(float(accuracy), float(np.bincount(labels).max() / len(labels)), float(null.mean()),
                        float(np.quantile(null, 0.95)), float((1 + (null >= accuracy).sum()) / (1 + n_permutations)),
                        folds, n_permutations)
