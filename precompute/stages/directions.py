"""Stage `directions`: refusal directions per layer and category, chosen and tested causally.

1. Capture the residual stream (`blocks.{l}.hook_resid_pre`) at the prompt-end positions into
   running sums per prompt group: no prompt's activations are kept.
2. Candidates: difference of means, toxic minus safe, on the train split minus a validation
   part, for every (layer, position): one global set and one per category.
3. Score candidates on the validation part and choose one (Arditi et al. 2024).
4. Test it on the test split: generation with the direction ablated (toxic, hard) and added
   (safe, hard); KL and completion cross-entropy on safe prompts.
5. Geometry, from captures at the chosen position only (every layer for the toxic and safe
   prompts, streamed to a scratch file removed afterwards; the chosen layer for every prompt):
   separation and probe accuracy per layer for every model, projections, category
   cosines with bootstrap intervals, a refused-vs-answered direction from hard prompts, and the
   cross-ablation matrix (ablate category k's direction, measure category j's refusal score).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from engine.activations import capture, prompt_end_positions
from engine.direction_scoring import refusal_scores_under_ablation, score_candidates
from engine.directions import (
    GroupSums,
    SelectionRule,
    bootstrap_cosines,
    layer_separation,
    mean_difference,
    select_candidate,
    unit,
)
from engine.errors import ExplorerError
from engine.evaluation import judged_answers
from engine.interventions import ablation_hooks, addition_hooks, applied
from engine.judge import refusal_rate_table, refusal_score, refusal_token_ids
from engine.models import LoadedModel
from engine.prompts import CATEGORIES, stable_split
from engine.scoring import completion_cross_entropy, kl_divergence, next_token_logprobs
from precompute.config import StudyConfig
from precompute.pipeline import Stage, StageContext, StageOutput
from precompute.stages.generate import model_fingerprint

logger = logging.getLogger(__name__)


def evaluate_direction(model: LoadedModel, role: str, prompts: pd.DataFrame, baseline: pd.DataFrame,
                       direction: np.ndarray, layer: int, alpha: float | None, token_ids: list[int], *,
                       max_new_tokens: int, batch_size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Test-split effects of one direction on one model: answers under ablation (toxic, hard)
    and addition (safe, hard) next to the baseline, plus KL and completion cross-entropy on
    safe prompts under ablation. Returns (judged answers, harmlessness)."""
    tensor = torch.from_numpy(direction)
    evaluation = pd.concat([
        judged_answers(model, prompts[prompts["kind"] != "safe"], "ablation", ablation_hooks(model, tensor),
                token_ids, max_new_tokens=max_new_tokens, batch_size=batch_size),
        judged_answers(model, prompts[prompts["kind"] != "toxic"], "addition", addition_hooks(model, tensor, layer, alpha),
                token_ids, max_new_tokens=max_new_tokens, batch_size=batch_size),
    ], ignore_index=True)
    baseline = baseline[(baseline["model"] == role) & baseline["prompt_id"].isin(prompts["id"])]
    judged = pd.concat([baseline.assign(condition="baseline"), evaluation], ignore_index=True)
    judged = judged.drop(columns=["category", "kind", "split"], errors="ignore").merge(
        prompts[["id", "category", "kind"]], left_on="prompt_id", right_on="id").drop(columns="id")

    safe = prompts[prompts["kind"] == "safe"]
    texts = list(safe["text"])
    answers = baseline.set_index("prompt_id").loc[safe["id"], "response"].tolist()
    plain = next_token_logprobs(model, texts, batch_size=batch_size)
    ce_plain = completion_cross_entropy(model, texts, answers, batch_size=batch_size)
    with applied(model, ablation_hooks(model, tensor)):
        ablated = next_token_logprobs(model, texts, batch_size=batch_size)
        ce_ablated = completion_cross_entropy(model, texts, answers, batch_size=batch_size)
    kl = kl_divergence(plain, ablated)
    # Ablation also removes a safe prompt's own pull towards refusing, which counts as KL: report
    # the KL on the safe prompts the model does not lean to refuse (refusal tokens < 5%) as well.
    settled = refusal_score(plain[:, token_ids]) < np.log(0.05 / 0.95)
    harmlessness = pd.DataFrame([
        {"condition": "baseline", "n": len(safe), "mean_kl": 0.0, "median_kl": 0.0, "n_not_leaning": int(settled.sum()),
         "mean_kl_not_leaning": 0.0, "mean_cross_entropy": float(np.nanmean(ce_plain))},
        {"condition": "ablation", "n": len(safe), "mean_kl": float(kl.mean()), "median_kl": float(np.median(kl)),
         "n_not_leaning": int(settled.sum()), "mean_kl_not_leaning": float(kl[settled].mean()),
         "mean_cross_entropy": float(np.nanmean(ce_ablated))},
    ])
    return judged.assign(model=role), harmlessness.assign(model=role)


def _hard_prompt_direction(acts: np.ndarray, hard_refused: np.ndarray, hard_answered: np.ndarray,
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


class DirectionsStage(Stage):
    name = "directions"
    version = 6
    upstream = ("prompts", "generate")

    def applies(self, config: StudyConfig) -> bool:
        return config.directions is not None

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        return {
            "directions": config.section("directions"),
            "models": {role: model_fingerprint(spec) for role, spec in config.models.items()},
            "batch_size": config.generation.batch_size,
            "dtype": config.generation.dtype_name,
        }

    def run(self, context: StageContext) -> StageOutput:
        key = self.inputs(context.config) | {"prompts": context.hashes["prompts"]}
        with context.scratch("activations", key) as scratch:
            return self._run(context, scratch)

    def _run(self, context: StageContext, scratch: Path) -> StageOutput:
        config = context.config
        settings = config.directions
        assert settings is not None  # applies() guarantees it
        batch_size = config.generation.batch_size
        role = settings.model
        prompts = context.table("prompts").drop(columns="run_id").reset_index(drop=True)
        generations = context.table("generations").drop(columns="run_id")
        tokens = context.table("refusal_tokens")
        token_ids = refusal_token_ids(tokens, role)
        model = config.generation.load(config.models[role])
        positions = prompt_end_positions(model.tokenizer)
        hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.n_layers)]

        kind = prompts["kind"].to_numpy()
        category = prompts["category"].to_numpy()
        toxic, safe = kind == "toxic", kind == "safe"
        train = (prompts["split"] == "train").to_numpy()
        validation = train & np.array(
            [stable_split("validation:" + t, settings.validation_fraction) == "test" for t in prompts["text"]])
        fit, test = train & ~validation, (prompts["split"] == "test").to_numpy()

        wanted = [c for c in config.prompts.categories if c in CATEGORIES]
        categories = [c for c in wanted if (toxic & fit & (category == c)).any()]
        if empty := sorted(set(wanted) - set(categories)):
            raise ExplorerError(
                f"No toxic training prompts in categor{'y' if len(empty) == 1 else 'ies'} {empty}: "
                "no category direction can be computed.",
                "add toxic prompts for it or drop it from prompts.categories in the config.")
        # Every (layer, position)'s group sums, [layers, positions, d_model] each: memory does not
        # grow with the number of prompts, and no activation goes to disk.
        groups = {"toxic": toxic & fit, "safe": safe & fit} | {
            f"toxic {c}": toxic & fit & (category == c) for c in categories}
        sums = GroupSums(groups, (len(prompts), model.n_layers, len(positions.offsets), model.d_model))
        capture(model, list(prompts["text"]), hooks, positions.offsets, batch_size=batch_size,
                desc=f"capture {role}", out=sums)
        global_candidates = sums.mean_difference("toxic", "safe")

        rng = np.random.default_rng(settings.seed)

        def sample(mask: np.ndarray) -> list[str]:
            rows = np.flatnonzero(mask)
            rows = rng.choice(rows, size=min(len(rows), settings.max_validation_prompts), replace=False)
            return list(prompts["text"].to_numpy()[np.sort(rows)])

        cutoff = model.n_layers * (1 - settings.prune_last_fraction)
        layers = [layer for layer in range(0, model.n_layers, settings.layer_stride) if layer < cutoff]
        scored = score_candidates(model, global_candidates, layers, positions.labels, token_ids,
                                  sample(validation & toxic), sample(validation & safe),
                                  alpha=settings.addition_alpha, batch_size=batch_size)
        rule = SelectionRule(max_kl=settings.max_kl, prune_last_fraction=settings.prune_last_fraction)
        candidates = select_candidate(scored, model.n_layers, rule)
        if not candidates["chosen"].any():
            best = candidates["ablation_score"].idxmin()
            candidates.loc[best, "chosen"] = True
            logger.warning("No candidate passed the selection filters; using the lowest ablation score "
                           "(layer %d), marked in direction_candidates.", candidates.loc[best, "layer"])
        chosen = candidates[candidates["chosen"]].iloc[0]
        layer, position = int(chosen["layer"]), int(chosen["position"])
        logger.info("Chosen direction: layer %d, position %s (ablation %.2f, induce %.2f, KL %.3f)",
                    layer, chosen["position_label"], chosen["ablation_score"], chosen["induce_score"], chosen["kl"])
        direction = global_candidates[layer, position]
        # Per category, every layer at the chosen position: [layers, d_model] each.
        category_candidates = {c: sums.mean_difference(f"toxic {c}", "safe")[:, position] for c in categories}
        category_directions = {c: vectors[layer] for c, vectors in category_candidates.items()}

        # Causal evaluation on the test split.
        test_prompts = prompts[test]
        evaluate = {"max_new_tokens": settings.eval_max_new_tokens, "batch_size": batch_size}
        judged_frames, harmless_frames = [], []
        judged, harmlessness = evaluate_direction(model, role, test_prompts, generations, direction, layer,
                                                  settings.addition_alpha,
                                                  token_ids, **evaluate)
        judged_frames.append(judged)
        harmless_frames.append(harmlessness)

        # Cross-ablation: ablate each direction, read each category's toxic test prompts.
        toxic_test = test_prompts[test_prompts["kind"] == "toxic"]
        cross_rows = []
        for name, vector in [("none", None), ("global", direction), *category_directions.items()]:
            scores = refusal_scores_under_ablation(
                model, None if vector is None else torch.from_numpy(vector), list(toxic_test["text"]),
                token_ids, batch_size=batch_size)
            for target, group in toxic_test.assign(score=scores).groupby("category"):
                cross_rows.append({"ablated": name, "category": target, "n": len(group),
                                   "mean_refusal_score": float(group["score"].mean()),
                                   "refusal_rate_by_score": float((group["score"] > 0).mean())})

        # Geometry at the chosen position, for every model of the study. Per layer, toxic and safe
        # prompts only ([n_toxic + n_safe, layers, d_model], on disk); the studied model's chosen
        # site also for every prompt ([n, d_model], for projections, cosines and hard prompts).
        separation_rows, projection_frames = [], []
        both = toxic | safe  # separation compares toxic with safe prompts
        offset = [positions.offsets[position]]
        site = capture(model, list(prompts["text"]), [hooks[layer]], offset, batch_size=batch_size,
                       desc=f"capture {role} at the chosen site")[:, 0, 0, :]
        for other_role, spec in config.models.items():
            other = model if other_role == role else config.generation.load(spec)
            on_disk = np.lib.format.open_memmap(scratch / f"{other_role}.npy", mode="w+", dtype=np.float32,
                                                shape=(int(both.sum()), model.n_layers, 1, model.d_model))
            layer_acts = capture(other, list(prompts["text"][both]), hooks, offset, batch_size=batch_size,
                                 desc=f"capture {other_role} at the chosen position", out=on_disk)[:, :, 0, :]
            fit_rows = fit[both]
            separation = layer_separation(layer_acts, toxic[both], fit_rows, test[both])
            separation_rows.append(separation.assign(model=other_role))
            own_vector = mean_difference(layer_acts[:, layer], toxic[both] & fit_rows, safe[both] & fit_rows)
            if other_role != role:
                # The same site's direction in the other model, tested the same way (no search).
                other_tokens = refusal_token_ids(tokens, other_role)
                judged, harmlessness = evaluate_direction(other, other_role, test_prompts, generations, own_vector,
                                                          layer, settings.addition_alpha, other_tokens, **evaluate)
                judged_frames.append(judged)
                harmless_frames.append(harmlessness)
            rows = np.ones(len(prompts), dtype=bool) if other_role == role else both
            projected = site if other_role == role else np.asarray(layer_acts[:, layer])
            projection_frames.append(
                prompts.loc[rows, ["id", "category", "kind", "split"]].rename(columns={"id": "prompt_id"})
                .assign(model=other_role, projection=projected @ unit(own_vector)))
        cosines = bootstrap_cosines(site[fit], np.where(toxic[fit], category[fit], ""),
                                    categories, safe[fit], n_boot=settings.bootstrap, seed=settings.seed)
        verdict = prompts["id"].map(generations[generations["model"] == role].set_index("prompt_id")["refused"])
        hard_refused = (kind == "hard") & verdict.eq(True).to_numpy()
        hard_answered = (kind == "hard") & verdict.eq(False).to_numpy()
        hard_direction = _hard_prompt_direction(site, hard_refused, hard_answered, direction,
                                                n_boot=settings.bootstrap, seed=settings.seed)

        vectors = [{"scope": "global", "layer": lay, "position": position, "chosen": lay == layer,
                    "norm": float(np.linalg.norm(global_candidates[lay, position])),
                    "vector": global_candidates[lay, position].astype(np.float32).tolist()}
                   for lay in range(model.n_layers)]
        vectors += [{"scope": name, "layer": lay, "position": position, "chosen": lay == layer,
                     "norm": float(np.linalg.norm(per_layer[lay])), "vector": per_layer[lay].astype(np.float32).tolist()}
                    for name, per_layer in category_candidates.items() for lay in range(model.n_layers)]
        return StageOutput(
            tables={
                "direction_candidates": candidates.assign(model=role),
                "refusal_directions": pd.DataFrame(vectors).assign(model=role),
                "direction_generations": pd.concat(judged_frames, ignore_index=True),
                "direction_effects": refusal_rate_table(pd.concat(judged_frames, ignore_index=True),
                                                        ["model", "condition", "category", "kind"]),
                "direction_harmlessness": pd.concat(harmless_frames, ignore_index=True),
                "cross_ablation": pd.DataFrame(cross_rows).assign(model=role),
                "layer_separation": pd.concat(separation_rows, ignore_index=True),
                "direction_projections": pd.concat(projection_frames, ignore_index=True),
                "category_cosines": cosines.assign(model=role),
                "hard_prompt_direction": pd.DataFrame([hard_direction]).assign(model=role),
            },
            models=tuple(config.models.values()),
        )
