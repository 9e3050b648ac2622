"""Stage `evaluation`: every model answers held-out prompt sets from outside the study's own set.

This is how over-refusal is measured on prompts the fine-tune never saw: plain instructions (for the
demo a fixed sample of refusal_direction's `harmless_val`, Alpaca-style) and held-out harmful
requests (`harmful_val`, and a fixed sample of AdvBench). A prompt the tune trained on or the study
fits on (its train split) is left out of every set and counted. Writes `evaluation_generations` (per set x prompt x model) and
`evaluation_rates` (per set x model x kind, Wilson 95% intervals; with the study's own hard test
prompts, from `generate`, as the set `study_hard_test`).
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from engine.data.prompt_sources import load_prompt_source
from engine.judging.evaluation import judged_answers
from engine.judging.judge import refusal_rate_table, refusal_token_ids
from precompute.config import StudyConfig
from precompute.pipeline import Stage, StageContext, StageOutput
from precompute.stages.generate import model_fingerprint
from precompute.stages.prompts import source_fingerprints

logger = logging.getLogger(__name__)

STUDY_HARD_SET = "study_hard_test"  # the study's own hard test prompts, listed beside the held-out sets


def held_out(prompts: pd.DataFrame, fitted_ids: set[str]) -> tuple[pd.DataFrame, int]:
    """The rows of `prompts` not among `fitted_ids`, and how many were left out."""
    keep = ~prompts["id"].isin(fitted_ids)
    return prompts[keep].reset_index(drop=True), int((~keep).sum())


class EvaluationStage(Stage):
    name = "evaluation"
    version = 1
    upstream = ("prompts", "tune", "generate")

    def applies(self, config: StudyConfig) -> bool:
        return config.evaluation is not None

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        assert config.evaluation is not None
        return {
            "evaluation": config.section("evaluation"),
            "files": source_fingerprints([entry["source"] for entry in config.evaluation.sets]),
            "models": {role: model_fingerprint(spec) for role, spec in config.models.items()},
            "dtype": config.generation.dtype_name,
        }

    def run(self, context: StageContext) -> StageOutput:
        config = context.config
        settings = config.evaluation
        assert settings is not None  # applies() guarantees it
        study = context.table("prompts")
        fitted = set(study.loc[study["split"] == "train", "id"])
        if "tune_data" in context.available:
            fitted |= set(context.table("tune_data")["prompt_id"])
        sets: list[pd.DataFrame] = []
        left_out = {}
        for entry in settings.sets:
            loaded = load_prompt_source(entry["source"], test_fraction=config.prompts.test_fraction)
            kept, left_out[entry["name"]] = held_out(loaded, fitted)
            logger.info("Evaluation set %s: %d prompts (%d left out: trained or fitted on)",
                        entry["name"], len(kept), left_out[entry["name"]])
            sets.append(kept.assign(set=entry["name"]))
        prompts = pd.concat(sets, ignore_index=True)
        tokens = context.table("refusal_tokens")
        frames: list[pd.DataFrame] = []
        for role, spec in config.models.items():
            model = config.generation.load(spec)
            answers = judged_answers(model, prompts, "baseline", [], refusal_token_ids(tokens, role),
                                     max_new_tokens=settings.max_new_tokens,
                                     batch_size=config.generation.batch_size)
            del model  # freed before the next one loads
            frames.append(answers.assign(model=role, set=prompts["set"].to_numpy()))
        generations = pd.concat(frames, ignore_index=True).merge(
            prompts[["id", "set", "text", "category", "kind", "source"]],
            left_on=["prompt_id", "set"], right_on=["id", "set"]).drop(columns="id")
        # The study's own hard test prompts (answered by `generate`) beside the sets: over-refusal of
        # prompts that only sound harmful.
        study_generations = context.table("generations")
        hard = study_generations[(study_generations["kind"] == "hard") & (study_generations["split"] == "test")]
        rates = pd.concat([refusal_rate_table(generations, ["set", "model", "kind"]),
                           refusal_rate_table(hard.assign(set=STUDY_HARD_SET), ["set", "model", "kind"])],
                          ignore_index=True)
        rates["n_left_out"] = rates["set"].map(left_out | {STUDY_HARD_SET: 0})
        return StageOutput(tables={"evaluation_generations": generations, "evaluation_rates": rates},
                           models=tuple(config.models.values()))
