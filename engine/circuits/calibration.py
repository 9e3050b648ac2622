"""Calibration by planted effects: at this study's sizes and noise, when does the decision rule say
"modular", and does it keep quiet when categories do not differ?

From one kind's real per-prompt effects: the residuals (each prompt minus its category mean, scaled
by sqrt(n / (n - 1)) so that their spread is the noise's), the shared component (the pooled mean
effect) and one category-specific direction per category (the shared component's own entries moved
to other nodes by a random permutation per category, then centred over categories and made
orthogonal to the shared component: tails on other features, as sparse and as heavy as the shared
core). A simulated study with category share q has category means sqrt(1 - q) s + sqrt(q) t_k,
scaled so that exactly q of sum_k ||mean_k||^2 is category-specific, and each prompt is its
category's mean plus a residual drawn with replacement from the study's own. The full decision
(`engine.circuits.verdict.assess`) runs on every simulated study.

Everything lives in an exact orthonormal basis of the residuals, the shared component and the tails
(at most n_prompts + K + 1 dimensions), so a simulation costs the same at 4,600 nodes as at 50.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

from engine.circuits.verdict import LABELS, Grouped, Rule, assess, grouped
from engine.errors import ExplorerError

DETECTED = ("partially modular", "modular")  # labels that name category structure
POWER = 0.8  # the conventional power a "detectable" share must reach


@dataclass(frozen=True)
class PlantedStudy:
    """A kind's study reduced to what planted-effect simulations need."""

    residuals: np.ndarray  # [n_prompts, d]
    shared: np.ndarray  # [d]
    tails: np.ndarray  # [K, d]: sum over k of ||tail_k||^2 is K ||shared||^2
    sizes: tuple[int, ...]

    def means(self, share: float) -> np.ndarray:
        """[K, d]: category means whose category-specific share of the energy is `share`."""
        return np.sqrt(1 - share) * self.shared + np.sqrt(share) * self.tails

    def true_ratio(self, share: float) -> float:
        """What the rule's ratio estimates: the mean pairwise cosine of the true category means (the
        ceiling of a noise-free study is 1)."""
        means = self.means(share)
        unit = means / np.linalg.norm(means, axis=1, keepdims=True)
        return float((unit @ unit.T)[np.triu_indices(len(means), 1)].mean())

    def simulate(self, share: float, rng: np.random.Generator, *, scale: int = 1) -> Grouped:
        """One simulated study with `scale` times the study's prompts per category."""
        means = self.means(share)
        return grouped([means[k] + self.residuals[rng.integers(0, len(self.residuals), n * scale)]
                        for k, n in enumerate(self.sizes)])


def planted_study(groups: Sequence[np.ndarray], *, seed: int) -> PlantedStudy:
    """The planted-effect model of a kind's categories, effects [n_k, n_nodes] each."""
    groups = [np.asarray(group, dtype=np.float64) for group in groups]
    shared = np.concatenate(groups).mean(0)
    if not np.any(shared):
        raise ExplorerError("The node effects are all zero: there is nothing to calibrate on.",
                            "check the circuits metric and the SAEs, then rerun the circuits stage.")
    residuals = np.concatenate([(g - g.mean(0)) * np.sqrt(len(g) / (len(g) - 1)) for g in groups])
    rng = np.random.default_rng(seed)
    tails = np.stack([shared[rng.permutation(len(shared))] for _ in groups])
    tails -= tails.mean(0)
    tails -= np.outer(tails @ shared / (shared @ shared), shared)
    tails *= np.sqrt(len(groups) * (shared @ shared) / (tails**2).sum())
    basis = np.linalg.qr(np.vstack([residuals, shared, tails]).T)[0]  # [n_nodes, d], orthonormal columns
    return PlantedStudy(residuals @ basis, shared @ basis, tails @ basis, tuple(len(g) for g in groups))


def truth(ratio: float, rule: Rule) -> str:
    """The label a noise-free study with this true ratio deserves."""
    if ratio >= rule.monolithic_ratio:
        return "monolithic"
    return "partially modular" if ratio >= rule.modular_ratio else "modular"


def _simulations(study: PlantedStudy, rule: Rule, share: float, scale: int, n_simulations: int,
                 rng: np.random.Generator) -> dict:
    """One row of the calibration table: the rule's verdicts on `n_simulations` planted studies. One
    BLAS thread: the matrices are small, and more threads spin more than they compute (5x the CPU
    time measured on 2 cores)."""
    with threadpool_limits(limits=1, user_api="blas"):
        decisions = [assess(study.simulate(share, rng, scale=scale), rule, seed=int(rng.integers(2**31)))
                     for _ in range(n_simulations)]
    labels = pd.Series([d.label for d in decisions])
    true_ratio = study.true_ratio(share)
    return {
        "share": share, "scale": scale, "prompts_per_category": min(study.sizes) * scale,
        "n_simulations": n_simulations, "true_ratio": true_ratio, "truth": truth(true_ratio, rule),
        "ratio_median": float(np.median([d.interval.ratio.value for d in decisions])),
        "ratio_low_median": float(np.median([d.interval.ratio.low for d in decisions])),
        "ratio_high_median": float(np.median([d.interval.ratio.high for d in decisions])),
        "share_estimate_median": float(np.median([d.interval.category_share.value for d in decisions])),
        **{label.replace(" ", "_"): float((labels == label).mean()) for label in LABELS},
        "rejected": float(np.mean([d.p_value < rule.alpha for d in decisions])),
        "detected": float(labels.isin(DETECTED).mean()),
        "correct": float((labels == truth(true_ratio, rule)).mean()),
    }


def calibrate(study: PlantedStudy, rule: Rule, *, shares: Sequence[float], n_simulations: int,
              seed: int) -> pd.DataFrame:
    """The verdict against the planted share q at the study's own sizes: a row per share with the
    share of simulations given each label, how often category structure was detected
    (`detected`: partially modular or modular) and how often the label matched the truth."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame([_simulations(study, rule, share, 1, n_simulations, rng) for share in shares])


def smallest_detectable_share(table: pd.DataFrame, power: float = POWER) -> float:
    """The smallest planted share at which the rule detects category structure in at least `power`
    of the simulations at the study's sizes (NaN: none on the grid)."""
    reached = table[(table["scale"] == 1) & (table["detected"] >= power)]
    return float(reached["share"].min()) if len(reached) else float("nan")


def decisive_scale(study: PlantedStudy, rule: Rule, *, share: float, scales: Sequence[int], n_simulations: int,
                   seed: int, power: float = POWER) -> tuple[pd.DataFrame, int | None]:
    """How many times the study's prompts per category would let the rule decide (any label but
    inconclusive in at least `power` of simulations) if the true category share were `share`: the
    rows simulated, and the first scale that decides (None: none of `scales`)."""
    rng = np.random.default_rng(seed)
    rows = []
    for scale in scales:
        rows.append(_simulations(study, rule, share, scale, n_simulations, rng))
        if rows[-1]["inconclusive"] <= 1 - power:
            return pd.DataFrame(rows), scale
    return pd.DataFrame(rows), None
