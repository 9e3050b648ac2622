"""Causal tests of candidate refusal directions, by intervening on a loaded model.

Each candidate gets three numbers on validation prompts (Arditi et al. 2024):
- ablation score: mean refusal score on toxic prompts with the direction ablated (lower is better);
- induce score: mean refusal score on safe prompts with the direction added at its layer;
- KL: mean KL divergence of the next-token distribution on safe prompts under ablation.

And the trade-off between the two for spans of directions ablated with a weight (`ablation_tradeoff`),
and the chosen direction's effects on test prompts (`direction_effects`, `harmlessness_table`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from engine.judging.evaluation import judged_answers
from engine.judging.judge import refusal_score
from engine.runtime.interventions import ablation_hooks, addition_hooks, applied
from engine.runtime.models import LoadedModel
from engine.runtime.scoring import completion_cross_entropy, kl_divergence, next_token_logprobs
from engine.stats import wilson_interval


def score_candidates(
    model: LoadedModel,
    candidates: np.ndarray,
    layers: Sequence[int],
    position_labels: Sequence[str],
    refusal_token_ids: Sequence[int],
    toxic_prompts: Sequence[str],
    safe_prompts: Sequence[str],
    *,
    alpha: float | None,
    batch_size: int,
) -> pd.DataFrame:
    """Score `candidates[layer, position]` ([n_layers, n_positions, d_model]) for the given layers.

    Addition uses `alpha` times the unit direction, or the candidate's own norm when None."""
    ids = list(refusal_token_ids)
    baseline_safe = next_token_logprobs(model, safe_prompts, batch_size=batch_size)
    both = list(toxic_prompts) + list(safe_prompts)
    n_toxic = len(toxic_prompts)
    rows = []
    pairs = [(layer, position) for layer in layers for position in range(candidates.shape[1])]
    for layer, position in tqdm(pairs, desc="score candidates", unit="candidate"):
        direction = torch.from_numpy(candidates[layer, position])
        if float(direction.norm()) == 0.0:
            # e.g. layer 0 at a template token: every prompt has the same activation there
            rows.append({"layer": layer, "position": position, "position_label": position_labels[position],
                         "ablation_score": np.nan, "induce_score": np.nan, "kl": np.nan})
            continue
        with applied(model, ablation_hooks(model, direction)):
            ablated = next_token_logprobs(model, both, batch_size=batch_size)
        with applied(model, addition_hooks(model, direction, layer, alpha)):
            added = next_token_logprobs(model, safe_prompts, batch_size=batch_size, token_ids=ids)
        rows.append({
            "layer": layer,
            "position": position,
            "position_label": position_labels[position],
            "ablation_score": float(refusal_score(ablated[:n_toxic][:, ids]).mean()),
            "induce_score": float(refusal_score(added).mean()),
            "kl": float(kl_divergence(baseline_safe, ablated[n_toxic:]).mean()),
        })
    return pd.DataFrame(rows)


def refusal_scores_under_ablation(
    model: LoadedModel,
    direction: torch.Tensor | None,
    prompts: Sequence[str],
    refusal_token_ids: Sequence[int],
    *,
    batch_size: int,
) -> np.ndarray:
    """Per-prompt refusal score with `direction` ablated (no intervention when None)."""
    hooks = [] if direction is None else ablation_hooks(model, direction)
    with applied(model, hooks):
        logprobs = next_token_logprobs(model, prompts, batch_size=batch_size, token_ids=list(refusal_token_ids))
    return refusal_score(logprobs)


def point_label(source: str, size: float) -> str:
    """A trade-off point's name as tables and pages show it: "cone 2", "weight 0.25", "strength 1"."""
    return f"{source} {size:g}"


@dataclass(frozen=True)
class AblationPoint:
    """One point of the refusal / side-effect trade-off: a span of directions ablated with a weight."""

    source: str  # "weight", "cone" or "categories"
    size: float  # the weight, or the number of directions spanned
    directions: np.ndarray  # [k, d_model]
    weight: float = 1.0
    sites: str = ""  # which directions, in words

    @property
    def label(self) -> str:
        return point_label(self.source, self.size)


@dataclass(frozen=True)
class OwnAnswers:
    """Prompts and the model's own unsteered answers to them, whose cross-entropy an intervention may raise."""

    prompts: list[str]
    answers: list[str]


def ablation_tradeoff(model: LoadedModel, points: Sequence[AblationPoint], toxic_prompts: Sequence[str],
                      safe_prompts: Sequence[str], refusal_token_ids: Sequence[int], *,
                      batch_size: int, own_answers: OwnAnswers | None = None) -> pd.DataFrame:
    """Per point and prompt (its index in its list): the refusal score of each toxic prompt and the KL of
    each safe prompt's next-token distribution to the unablated model's, under the point's ablation; with
    `own_answers` also each answer's cross-entropy (kind `answer_ce`; unablated under source `none`).
    Columns: source, size, kind, prompt, value."""
    ids = list(refusal_token_ids)
    plain = next_token_logprobs(model, safe_prompts, batch_size=batch_size)

    def answer_ce(source: str, size: float) -> list[pd.DataFrame]:
        if own_answers is None:
            return []
        ce = completion_cross_entropy(model, own_answers.prompts, own_answers.answers, batch_size=batch_size)
        return [pd.DataFrame({"source": source, "size": size, "kind": "answer_ce", "prompt": np.arange(len(ce)),
                              "value": ce})]

    frames = answer_ce("none", 0)
    for point in tqdm(points, desc="trade-off points", unit="point"):
        with applied(model, ablation_hooks(model, torch.from_numpy(point.directions), point.weight)):
            scores = refusal_score(next_token_logprobs(model, toxic_prompts, batch_size=batch_size, token_ids=ids))
            kl = kl_divergence(plain, next_token_logprobs(model, safe_prompts, batch_size=batch_size))
            frames += answer_ce(point.source, point.size)
        which = {"source": point.source, "size": point.size}
        frames += [pd.DataFrame({**which, "kind": "toxic", "prompt": np.arange(len(scores)), "value": scores}),
                   pd.DataFrame({**which, "kind": "safe", "prompt": np.arange(len(kl)), "value": kl})]
    return pd.concat(frames, ignore_index=True)


def mean_interval(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> tuple[float, float, float]:
    """The mean of `values` (NaNs left out) and its percentile bootstrap 95% interval; NaNs when empty."""
    values = values[~np.isnan(values)]
    if not len(values):
        return np.nan, np.nan, np.nan
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def tradeoff_table(per_prompt: pd.DataFrame, points: Sequence[AblationPoint], *, n_boot: int,
                   seed: int) -> pd.DataFrame:
    """One row per point from `ablation_tradeoff`'s rows: toxic prompts still refused by the refusal score
    (> 0) with a Wilson 95% interval, the mean KL on safe prompts and the mean cross-entropy of the safe
    answers (NaN where not measured; `baseline_ce` unablated) with bootstrap 95% intervals, and whether the
    point is on the Pareto front (no other point refuses less at no more KL)."""
    rng = np.random.default_rng(seed)
    unablated = per_prompt[(per_prompt["source"] == "none") & (per_prompt["kind"] == "answer_ce")]["value"]
    baseline_ce = float(np.nanmean(unablated)) if len(unablated) else np.nan
    rows = []
    for point in points:
        mine = per_prompt[(per_prompt["source"] == point.source) & (per_prompt["size"] == point.size)]
        scores = mine.loc[mine["kind"] == "toxic", "value"].to_numpy()
        kl = mine.loc[mine["kind"] == "safe", "value"].to_numpy()
        refused = int((scores > 0).sum())
        low, high = wilson_interval(refused, len(scores))
        mean_kl, kl_low, kl_high = mean_interval(kl, rng, n_boot)
        mean_ce, ce_low, ce_high = mean_interval(mine.loc[mine["kind"] == "answer_ce", "value"].to_numpy(), rng, n_boot)
        rows.append({"point": point.label, "source": point.source, "size": point.size, "weight": point.weight,
                     "n_directions": len(point.directions), "sites": point.sites, "n_toxic": len(scores),
                     "n_refused": refused, "rate": refused / len(scores), "ci_low": float(low),
                     "ci_high": float(high), "mean_refusal_score": float(scores.mean()), "n_safe": len(kl),
                     "mean_kl": mean_kl, "kl_low": kl_low, "kl_high": kl_high, "mean_ce": mean_ce,
                     "ce_low": ce_low, "ce_high": ce_high, "baseline_ce": baseline_ce})
    table = pd.DataFrame(rows)
    rate, kl = table["rate"].to_numpy(), table["mean_kl"].to_numpy()
    dominated = [bool(((rate <= r) & (kl <= k) & ((rate < r) | (kl < k))).any()) for r, k in zip(rate, kl, strict=True)]
    return table.assign(pareto=~np.array(dominated))


def addition_sweep(model: LoadedModel, direction: np.ndarray, layer: int, strengths: Sequence[float],
                   prompts: dict[str, Sequence[str]], refusal_token_ids: Sequence[int], *,
                   batch_size: int, own_answers: OwnAnswers | None = None) -> pd.DataFrame:
    """Per strength (times the direction's own norm; 0 = unsteered), kind and prompt: the refusal score
    with the direction added at `layer`, and for safe prompts the KL of the next-token distribution to
    the unsteered one; given `own_answers`, the cross-entropy of each of those answers (kind
    `answer_ce`, score and kl NaN). Columns: strength, kind, prompt, score, kl, ce (NaN where not measured)."""
    ids = list(refusal_token_ids)
    norm = float(np.linalg.norm(direction))
    plain = next_token_logprobs(model, list(prompts["safe"]), batch_size=batch_size)
    frames = []
    for strength in tqdm(strengths, desc="addition strengths", unit="strength"):
        hooks = addition_hooks(model, torch.from_numpy(np.asarray(direction, np.float32)), layer,
                               strength * norm) if strength else []
        with applied(model, hooks):
            for kind, texts in prompts.items():
                logprobs = next_token_logprobs(model, list(texts), batch_size=batch_size)
                kl = kl_divergence(plain, logprobs) if kind == "safe" else np.full(len(texts), np.nan)
                frames.append(pd.DataFrame({"strength": strength, "kind": kind, "prompt": np.arange(len(texts)),
                                            "score": refusal_score(logprobs[:, ids]), "kl": kl, "ce": np.nan}))
            if own_answers is not None:
                ce = completion_cross_entropy(model, own_answers.prompts, own_answers.answers, batch_size=batch_size)
                frames.append(pd.DataFrame({"strength": strength, "kind": "answer_ce", "prompt": np.arange(len(ce)),
                                            "score": np.nan, "kl": np.nan, "ce": ce}))
    return pd.concat(frames, ignore_index=True)


def addition_table(per_prompt: pd.DataFrame, *, n_boot: int, seed: int) -> pd.DataFrame:
    """One row per strength and kind from `addition_sweep`: prompts refused by the refusal score (> 0)
    with a Wilson 95% interval; for safe prompts the mean KL and the mean cross-entropy of the model's own
    answers (where measured), each with a bootstrap 95% interval."""
    rng = np.random.default_rng(seed)
    ce_by_strength = {float(cast(float, strength)): rows["ce"].to_numpy(dtype=float)
                      for strength, rows in per_prompt[per_prompt["kind"] == "answer_ce"].groupby("strength")}
    rows = []
    for keys, group in per_prompt[per_prompt["kind"] != "answer_ce"].groupby(["strength", "kind"], sort=True):
        strength, kind = cast(tuple[float, str], keys)
        refused = int((group["score"] > 0).sum())
        low, high = wilson_interval(refused, len(group))
        mean_kl, kl_low, kl_high = mean_interval(group["kl"].to_numpy(dtype=float), rng, n_boot)
        ce = ce_by_strength.get(float(strength), np.array([])) if kind == "safe" else np.array([])
        mean_ce, ce_low, ce_high = mean_interval(ce, rng, n_boot)
        rows.append({"point": point_label("strength", strength), "strength": float(strength), "kind": kind,
                     "n": len(group), "n_refused": refused, "rate": refused / len(group), "ci_low": float(low),
                     "ci_high": float(high), "mean_refusal_score": float(group["score"].mean()),
                     "mean_kl": mean_kl, "kl_low": kl_low, "kl_high": kl_high,
                     "mean_ce": mean_ce, "ce_low": ce_low, "ce_high": ce_high})
    return pd.DataFrame(rows)


def direction_effects(model: LoadedModel, prompts: pd.DataFrame, direction: np.ndarray, layer: int,
                      alpha: float | None, token_ids: list[int], answers: pd.Series, *, max_new_tokens: int,
                      batch_size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One direction's effects on each of `prompts` (test prompts): judged answers under ablation
    (toxic, hard) and addition (safe, hard), and per safe prompt the KL under ablation and the
    cross-entropy of its own baseline answer (`answers`, by prompt id) with and without."""
    tensor = torch.from_numpy(direction)
    judged = pd.concat([
        judged_answers(model, prompts[prompts["kind"] != "safe"], "ablation", ablation_hooks(model, tensor),
                       token_ids, max_new_tokens=max_new_tokens, batch_size=batch_size),
        judged_answers(model, prompts[prompts["kind"] != "toxic"], "addition",
                       addition_hooks(model, tensor, layer, alpha), token_ids, max_new_tokens=max_new_tokens,
                       batch_size=batch_size),
    ], ignore_index=True)
    safe = prompts[prompts["kind"] == "safe"]
    texts, completions = list(safe["text"]), answers.loc[safe["id"]].tolist()
    plain = next_token_logprobs(model, texts, batch_size=batch_size)
    ce_plain = completion_cross_entropy(model, texts, completions, batch_size=batch_size)
    with applied(model, ablation_hooks(model, tensor)):
        ablated = next_token_logprobs(model, texts, batch_size=batch_size)
        ce_ablated = completion_cross_entropy(model, texts, completions, batch_size=batch_size)
    # Ablation also undoes the refusals of the safe prompts the model refuses, which counts as KL:
    # the harmlessness table also reports the KL on the others, the population the direction was
    # chosen on (Arditi et al.'s filter: refusal score < 0).
    leaning = refusal_score(plain[:, token_ids]) >= 0 if len(safe) else np.zeros(0, bool)
    safe_rows = pd.DataFrame({"prompt_id": safe["id"].to_numpy(), "kl": kl_divergence(plain, ablated),
                              "leaning": leaning, "ce_plain": ce_plain, "ce_ablated": ce_ablated})
    return judged, safe_rows


def harmlessness_table(safe_rows: pd.DataFrame) -> pd.DataFrame:
    """Per condition (baseline, ablation): KL (mean, median, and on the safe prompts that do not
    lean to refuse, refusal score < 0) and the mean completion cross-entropy, from
    `direction_effects`' safe rows."""
    kl, settled = safe_rows["kl"].to_numpy(), ~safe_rows["leaning"].to_numpy(bool)
    return pd.DataFrame([
        {"condition": "baseline", "n": len(kl), "mean_kl": 0.0, "median_kl": 0.0, "n_not_leaning": int(settled.sum()),
         "mean_kl_not_leaning": 0.0, "mean_cross_entropy": float(np.nanmean(safe_rows["ce_plain"]))},
        {"condition": "ablation", "n": len(kl), "mean_kl": float(kl.mean()), "median_kl": float(np.median(kl)),
         "n_not_leaning": int(settled.sum()), "mean_kl_not_leaning": float(kl[settled].mean()),
         "mean_cross_entropy": float(np.nanmean(safe_rows["ce_ablated"]))},
    ])
