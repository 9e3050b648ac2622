"""Stage `steering`: what each intervention does, in batch, on the test split.

Interventions: the global refusal direction, each category's direction (both at the chosen layer
and position) and the features with the largest attribution to the refusal score at the refusal
layer's SAE. Each is applied two ways:
- suppress refusal: ablate the direction everywhere / clamp the feature to 0, on every prompt;
- force refusal: add the direction at its layer / set the feature to a multiple of its corpus
  maximum, on hard and safe prompts.
Refusal is read by the refusal score (> 0) for every intervention and by the substring judge on
generated answers for the global direction and the features. When the steered model is the one the
directions stage studies, the global direction's answers are that stage's (the same ablation and
addition on the same test prompts, generated once, at `directions.eval_max_new_tokens`); the answers this
stage generates may cover a seeded sample per kind (`steering.answer_prompts`). Under suppression, the KL
divergence on safe prompts and the cross-entropy of the model's own safe answers measure the side effects.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from engine.data.chunked import cached_frames
from engine.data.prompts import seeded_sample
from engine.data.store import rows_of
from engine.judging.evaluation import judged_answers
from engine.judging.judge import refusal_rate_table, refusal_score, refusal_token_ids
from engine.runtime.interventions import applied
from engine.runtime.scoring import completion_cross_entropy, kl_divergence, next_token_logprobs
from engine.saes.training import load_sae, stored_sae_source
from engine.steering.spec import Addition, FeatureClamp, Steering
from precompute.pipeline import ShardContext, ShardRound, StageContext, StageOutput
from precompute.shards import ShardSpec, in_shard
from precompute.stages.section import ModelSectionStage

logger = logging.getLogger(__name__)


def direction_answers(direction_generations: pd.DataFrame, prompts: pd.DataFrame, role: str) -> pd.DataFrame:
    """The global direction's judged answers to `prompts` as the directions stage generated them with
    `role`'s model: ablated on toxic prompts (suppress), added on safe ones (force)."""
    mine = direction_generations[(direction_generations["model"] == role)
                                 & direction_generations["prompt_id"].isin(prompts["id"])]
    suppress = mine[(mine["condition"] == "ablation") & (mine["kind"] == "toxic")].assign(condition="suppress")
    force = mine[(mine["condition"] == "addition") & (mine["kind"] == "safe")].assign(condition="force")
    columns = ["prompt_id", "response", "first_token_id", "n_new_tokens", "refused", "refusal_score", "condition"]
    return pd.concat([suppress, force], ignore_index=True)[columns].assign(intervention="global")


class SteeringStage(ModelSectionStage):
    name = "steering"
    version = 2
    upstream = ("prompts", "generate", "directions", "saes")
    # Sharded, each shard measures its test prompts under every intervention; the merge aggregates.
    shardable = True
    shard_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "steering_scores": ("intervention", "mode", "prompt_id"), "steering_safe": ("intervention", "prompt_id"),
        "steering_answers": ("intervention", "mode", "prompt_id")}


    def _interventions(self, context: StageContext,
                       device: torch.device) -> list[tuple[str, str, Steering, Steering]]:
        """(name, type, suppress, force) for every intervention of the study; SAEs load on `device`."""
        settings, studied = context.config.steering, context.config.directions
        assert settings is not None and studied is not None  # applies(); StudyConfig requires directions with steering
        directions = context.table("refusal_directions")
        chosen = directions[directions["chosen"]]
        interventions = []
        for row in rows_of(chosen):
            vector = np.asarray(row.vector, dtype=np.float32)
            interventions.append((row.scope, "direction", Steering(ablate=(vector,)), Steering(
                add=(Addition(vector, int(row.layer), studied.addition_alpha),))))
        if settings.top_features and "features" in context.available:
            saes = context.table("saes")
            refusal_layer = int(chosen["layer"].iloc[0])
            at_layer = saes[saes["layer"] == refusal_layer]
            if at_layer.empty:
                logger.warning("No SAE at the refusal layer %d: no features are steered.", refusal_layer)
                return interventions
            sae_row = at_layer.iloc[0]
            sae = load_sae(*stored_sae_source(context.config.store, sae_row.to_dict()), device=device)
            features = context.table("features").query("hook == @sae_row.hook and density > 0")
            for feature in rows_of(features.nlargest(settings.top_features, "attribution")):
                force_value = float(feature.max_activation) * settings.feature_force_multiple
                interventions.append((
                    f"feature {int(feature.feature)}", "feature",
                    Steering(clamp=(FeatureClamp(sae, (int(feature.feature),), value=0.0),)),
                    Steering(clamp=(FeatureClamp(sae, (int(feature.feature),), value=force_value),))))
        return interventions

    @staticmethod
    def _test_prompts(context: StageContext) -> pd.DataFrame:
        return context.table("prompts").query("split == 'test'").drop(columns="run_id").reset_index(drop=True)

    def _answered(self, context: StageContext, prompts: pd.DataFrame) -> np.ndarray:
        """Which of `prompts` the features' answers are generated for: all, or those in a seeded sample of
        `answer_prompts` per kind of every test prompt (so a shard answers its part of the same sample)."""
        settings = context.config.steering
        assert settings is not None  # applies() guarantees it
        if settings.answer_prompts is None:
            return np.ones(len(prompts), dtype=bool)
        test = self._test_prompts(context)
        sample = pd.concat([seeded_sample(test, kind, settings.answer_prompts, settings.seed)
                            for kind in ("toxic", "safe")])
        return prompts["id"].isin(sample["id"]).to_numpy()

    def _per_prompt(self, context: StageContext, prompts: pd.DataFrame) -> dict[str, pd.DataFrame]:
        """Every intervention's effect on each of `prompts` (test prompts, or one shard's slice):
        refusal scores, KL and completion cross-entropy on safe prompts, and judged answers."""
        config = context.config
        settings, studied = config.steering, config.directions
        assert settings is not None and studied is not None  # applies(); StudyConfig requires directions with steering
        batch_size = config.generation.batch_size
        role = settings.model
        model = config.generation.load(config.models[role])
        token_ids = refusal_token_ids(context.table("refusal_tokens"), role)
        generations = context.table("generations").query("model == @role").set_index("prompt_id")
        texts = list(prompts["text"])
        kind = prompts["kind"].to_numpy()
        safe, benign = kind == "safe", kind != "toxic"
        safe_texts = list(prompts.loc[safe, "text"])
        safe_answers = generations.loc[prompts.loc[safe, "id"], "response"].tolist()
        safe_ids, benign_ids = prompts.loc[safe, "id"].to_numpy(), prompts.loc[benign, "id"].to_numpy()
        answered = self._answered(context, prompts)

        @functools.cache
        def baseline() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """Unsteered next-token log-probs, refusal scores and safe-answer cross-entropy (once, and only
            when an intervention is still to be measured)."""
            logprobs = next_token_logprobs(model, texts, batch_size=batch_size)
            return (logprobs, refusal_score(logprobs[:, token_ids]),
                    completion_cross_entropy(model, safe_texts, safe_answers, batch_size=batch_size))

        def measure(order: int, name: str, kind_of: str, suppress: Steering,
                    force: Steering) -> dict[str, pd.DataFrame]:
            logger.info("Steering with %s", name)
            baseline_logprobs, baseline_scores, baseline_ce = baseline()
            # Completions and generated answers for the global direction and the features only
            # (the category directions are read by the refusal score alone, to keep the stage short).
            in_depth = name == "global" or kind_of == "feature"
            with applied(model, suppress.hooks(model)):
                suppressed = next_token_logprobs(model, texts, batch_size=batch_size)
                ce = completion_cross_entropy(model, safe_texts, safe_answers,
                                              batch_size=batch_size) if in_depth else np.full(len(safe_texts), np.nan)
            with applied(model, force.hooks(model)):
                forced = refusal_score(next_token_logprobs(
                    model, list(prompts.loc[benign, "text"]), batch_size=batch_size, token_ids=token_ids))
            which = {"order": order, "intervention": name, "type": kind_of}
            frames = {
                "scores": pd.concat([
                    pd.DataFrame({**which, "mode": "suppress", "prompt_id": prompts["id"].to_numpy(),
                                  "score": refusal_score(suppressed[:, token_ids]), "baseline": baseline_scores}),
                    pd.DataFrame({**which, "mode": "force", "prompt_id": benign_ids, "score": forced,
                                  "baseline": baseline_scores[benign]}),
                ], ignore_index=True),
                "safe": pd.DataFrame({
                    **which, "prompt_id": safe_ids, "kl": kl_divergence(baseline_logprobs[safe], suppressed[safe]),
                    "cross_entropy": ce, "in_depth": in_depth, "baseline_cross_entropy": baseline_ce}),
            }
            if name == "global" and role == studied.model:
                # The directions stage generated these very answers (its studied model, this vector); for
                # another model it used that model's own direction, so they are generated here instead.
                frames["answers"] = direction_answers(context.table("direction_generations"), prompts, role)
            elif in_depth:
                # Generated answers: refusal as users see it (the RCM seed's force/suppress rates).
                evaluate = {"max_new_tokens": settings.eval_max_new_tokens, "batch_size": batch_size}
                frames["answers"] = pd.concat([
                    judged_answers(model, prompts[(kind == "toxic") & answered], "suppress", suppress.hooks(model),
                                   token_ids, **evaluate),
                    judged_answers(model, prompts[safe & answered], "force", force.hooks(model), token_ids,
                                   **evaluate),
                ], ignore_index=True).assign(intervention=name)
            return frames

        # Each intervention's results are kept as they are measured: a re-run after a crash measures
        # only the ones still missing.
        measured = [
            cached_frames(context.cache(self.name, {"inputs": context.hashes[self.name], "intervention": name,
                                                    "prompts": list(prompts["id"])}),
                          functools.partial(measure, order, name, kind_of, suppress, force))
            for order, (name, kind_of, suppress, force) in enumerate(self._interventions(context, model.device))]
        score_frames = [frames["scores"] for frames in measured]
        safe_frames = [frames["safe"] for frames in measured]
        answers = [frames["answers"] for frames in measured if "answers" in frames]
        return {"steering_scores": pd.concat(score_frames, ignore_index=True),
                "steering_safe": pd.concat(safe_frames, ignore_index=True),
                "steering_answers": pd.concat(answers, ignore_index=True).rename(columns={"condition": "mode"})}

    def _output(self, context: StageContext, prompts: pd.DataFrame, rows: Mapping[str, pd.DataFrame]) -> StageOutput:
        """The stage's tables from every test prompt's rows (`_per_prompt`, maybe over shards)."""
        settings = context.config.steering
        assert settings is not None  # applies() guarantees it
        role = settings.model
        groups = prompts[["id", "category", "kind"]]
        scores = rows["steering_scores"].merge(groups, left_on="prompt_id", right_on="id")
        effects = scores.groupby(["order", "intervention", "type", "mode", "category", "kind"], sort=False).agg(
            n=("score", "size"), n_refused_by_score=("score", lambda v: int((v > 0).sum())),
            rate_by_score=("score", lambda v: float((v > 0).mean())),
            baseline_rate_by_score=("baseline", lambda v: float((v > 0).mean())),
            mean_refusal_score=("score", "mean"))
        mode_order = {"suppress": 0, "force": 1}
        effects = effects.reset_index().sort_values(["order", "mode", "category", "kind"],
                                                    key=lambda c: c.map(mode_order) if c.name == "mode" else c)
        safe = rows["steering_safe"]
        harmlessness = safe.groupby(["order", "intervention", "type"], sort=True).apply(
            lambda g: pd.Series({"n_safe": len(g), "mean_kl": float(g["kl"].mean()),
                                 "cross_entropy": float(np.nanmean(g["cross_entropy"])) if g["in_depth"].all()
                                 else np.nan,
                                 "baseline_cross_entropy": float(np.nanmean(g["baseline_cross_entropy"]))}),
        ).reset_index()
        steered = rows["steering_answers"].merge(groups, left_on="prompt_id", right_on="id").drop(columns="id")
        return StageOutput(
            tables={"steering_effects": effects.drop(columns="order").reset_index(drop=True).assign(model=role),
                    "steering_harmlessness": harmlessness.drop(columns="order").astype({"n_safe": int}).assign(
                        model=role),
                    "steering_generations": steered.assign(model=role),
                    "steering_rates": refusal_rate_table(steered, ["intervention", "mode"]).assign(model=role)},
            models=(context.config.models[role],),
        )

    def run(self, context: StageContext) -> StageOutput:
        prompts = self._test_prompts(context)
        return self._output(context, prompts, self._per_prompt(context, prompts))

    def run_shard(self, context: ShardContext, shard: ShardSpec, current: ShardRound) -> dict[str, pd.DataFrame]:
        prompts = self._test_prompts(context)
        return self._per_prompt(context, prompts[in_shard(prompts["id"], shard)].reset_index(drop=True))

    def merge_shards(self, context: StageContext, tables: Mapping[str, pd.DataFrame],
                     current: ShardRound) -> StageOutput:
        return self._output(context, self._test_prompts(context), tables)
