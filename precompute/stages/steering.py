"""Stage `steering`: what each intervention does, in batch, on the test split.

Interventions: the global refusal direction, each category's direction (both at the chosen layer
and position) and the features with the largest attribution to the refusal score at the refusal
layer's SAE. Each is applied two ways:
- suppress refusal: ablate the direction everywhere / clamp the feature to 0, on every prompt;
- force refusal: add the direction at its layer / set the feature to a multiple of its corpus
  maximum, on hard and safe prompts.
Refusal is read by the refusal score (> 0) for every intervention and by the substring judge on
generated answers for the global direction and the features. Under suppression, the KL divergence
on safe prompts and the cross-entropy of the model's own safe answers measure the side effects.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from engine.evaluation import judged_answers
from engine.interventions import applied
from engine.judge import refusal_rate_table, refusal_score, refusal_token_ids
from engine.saes import load_sae, stored_sae_source
from engine.scoring import completion_cross_entropy, kl_divergence, next_token_logprobs
from engine.steering import Addition, FeatureClamp, Steering
from precompute.pipeline import StageContext, StageOutput
from precompute.stages.section import ModelSectionStage

logger = logging.getLogger(__name__)


class SteeringStage(ModelSectionStage):
    name = "steering"
    version = 1
    upstream = ("prompts", "generate", "directions", "saes")


    def _interventions(self, context: StageContext,
                       device: torch.device) -> list[tuple[str, str, Steering, Steering]]:
        """(name, type, suppress, force) for every intervention of the study; SAEs load on `device`."""
        settings = context.config.steering
        directions = context.table("refusal_directions")
        chosen = directions[directions["chosen"]]
        interventions = []
        for row in chosen.itertuples():
            vector = np.asarray(row.vector, dtype=np.float32)
            interventions.append((row.scope, "direction", Steering(ablate=(vector,)),
                                  Steering(add=(Addition(vector, int(row.layer)),))))
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
            for feature in features.nlargest(settings.top_features, "attribution").itertuples():
                force_value = float(feature.max_activation) * settings.feature_force_multiple
                interventions.append((
                    f"feature {int(feature.feature)}", "feature",
                    Steering(clamp=(FeatureClamp(sae, (int(feature.feature),), value=0.0),)),
                    Steering(clamp=(FeatureClamp(sae, (int(feature.feature),), value=force_value),))))
        return interventions

    def run(self, context: StageContext) -> StageOutput:
        config = context.config
        settings = config.steering
        batch_size = config.generation.batch_size
        role = settings.model
        model = config.generation.load(config.models[role])
        prompts = context.table("prompts").query("split == 'test'").reset_index(drop=True)
        tokens = context.table("refusal_tokens")
        token_ids = refusal_token_ids(tokens, role)
        generations = context.table("generations").query("model == @role").set_index("prompt_id")
        texts = list(prompts["text"])
        kind = prompts["kind"].to_numpy()
        safe, benign = kind == "safe", kind != "toxic"
        safe_answers = generations.loc[prompts.loc[safe, "id"], "response"].tolist()

        baseline = next_token_logprobs(model, texts, batch_size=batch_size)
        baseline_scores = refusal_score(baseline[:, token_ids])
        baseline_ce = float(np.nanmean(completion_cross_entropy(
            model, list(prompts.loc[safe, "text"]), safe_answers, batch_size=batch_size)))
        effects, harmlessness, answers = [], [], []
        interventions = self._interventions(context, model.device)
        for name, kind_of, suppress, force in interventions:
            logger.info("Steering with %s", name)
            # Completions and generated answers for the global direction and the features only
            # (the category directions are read by the refusal score alone, to keep the stage short).
            in_depth = name == "global" or kind_of == "feature"
            with applied(model, suppress.hooks(model)):
                suppressed = next_token_logprobs(model, texts, batch_size=batch_size)
                ce = completion_cross_entropy(model, list(prompts.loc[safe, "text"]), safe_answers,
                                              batch_size=batch_size) if in_depth else None
            with applied(model, force.hooks(model)):
                forced = refusal_score(next_token_logprobs(
                    model, list(prompts.loc[benign, "text"]), batch_size=batch_size, token_ids=token_ids))
            scores = {"suppress": (np.ones(len(prompts), bool), refusal_score(suppressed[:, token_ids])),
                      "force": (benign, forced)}
            for mode, (rows, values) in scores.items():
                frame = prompts.loc[rows, ["category", "kind"]].assign(
                    score=values, baseline=baseline_scores[rows])
                for (category, group_kind), group in frame.groupby(["category", "kind"]):
                    effects.append({"intervention": name, "type": kind_of, "mode": mode, "category": category,
                                    "kind": group_kind, "n": len(group),
                                    "n_refused_by_score": int((group["score"] > 0).sum()),
                                    "rate_by_score": float((group["score"] > 0).mean()),
                                    "baseline_rate_by_score": float((group["baseline"] > 0).mean()),
                                    "mean_refusal_score": float(group["score"].mean())})
            harmlessness.append({"intervention": name, "type": kind_of, "n_safe": int(safe.sum()),
                                 "mean_kl": float(kl_divergence(baseline[safe], suppressed[safe]).mean()),
                                 "cross_entropy": float(np.nanmean(ce)) if ce is not None else np.nan,
                                 "baseline_cross_entropy": baseline_ce})
            if in_depth:
                # Generated answers: refusal as users see it (the RCM seed's force/suppress rates).
                evaluate = {"max_new_tokens": settings.eval_max_new_tokens, "batch_size": batch_size}
                answers += [
                    judged_answers(model, prompts[kind == "toxic"], "suppress", suppress.hooks(model), token_ids,
                                   **evaluate).assign(intervention=name),
                    judged_answers(model, prompts[safe], "force", force.hooks(model), token_ids,
                                   **evaluate).assign(intervention=name),
                ]
        steered = pd.concat(answers, ignore_index=True).merge(
            prompts[["id", "category", "kind"]], left_on="prompt_id", right_on="id").drop(columns="id")
        steered = steered.rename(columns={"condition": "mode"})
        return StageOutput(
            tables={"steering_effects": pd.DataFrame(effects).assign(model=role),
                    "steering_harmlessness": pd.DataFrame(harmlessness).assign(model=role),
                    "steering_generations": steered.assign(model=role),
                    "steering_rates": refusal_rate_table(steered, ["intervention", "mode"]).assign(model=role)},
            models=(config.models[role],),
        )
