"""Stage `tune`: build the safety-tuned demo model from the embedded base model.

Applies when the study uses the embedded tuned model and has a `tune:` section. The base
model's answers to the benign training prompts are generated in resumable chunks first.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.data.chunked import map_by_id
from engine.data.paths import models_dir
from engine.data.prompt_forms import form_balance
from engine.data.prompt_sources import load_prompt_source
from engine.data.prompts import direction_validation
from engine.data.store import rows_of
from engine.judging.refusal_phrases import is_refusal
from engine.runtime.generation import answer_table
from engine.runtime.models import EMBEDDED_BASE, export_embedded_base, is_embedded_tuned
from engine.tuning import (
    SftExample,
    TuneConfig,
    check_refusal_categories,
    fine_tune,
    refusal_for,
    training_prompts,
)
from precompute.config import StudyConfig
from precompute.pipeline import Stage, StageContext, StageOutput
from precompute.stages.prompts import source_fingerprints

logger = logging.getLogger(__name__)

TUNE_INFO = "tune_info.json"


def built_with(input_hash: str) -> Path | None:
    """A tuned model folder under data/models whose tune had exactly these inputs, if one is there."""
    for info in sorted(models_dir().glob(f"*/{TUNE_INFO}")):
        recorded = json.loads(info.read_text())
        if recorded.get("input_hash") == input_hash and "losses" in recorded:
            return info.parent
    return None


class TuneStage(Stage):
    name = "tune"
    version = 4
    upstream = ("prompts",)
    runs_in_every_shard = False  # it saves the tuned model under data/models

    @staticmethod
    def tuned_spec(config: StudyConfig) -> str | None:
        """The study's model this stage builds (a data/models folder name), if any."""
        return next((spec for spec in config.models.values() if is_embedded_tuned(spec)), None)

    def applies(self, config: StudyConfig) -> bool:
        return config.tune is not None and self.tuned_spec(config) is not None

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        return {"tune": config.section("tune"), "base": EMBEDDED_BASE, "dtype": config.generation.dtype_name,
                "benign_files": source_fingerprints(config.tune.benign_sources if config.tune else ()),
                "directions_validation": config.directions.validation_fraction if config.directions else None}

    @staticmethod
    def _held_out(config: StudyConfig, prompts: pd.DataFrame) -> np.ndarray | None:
        """The directions' validation prompts: the direction is chosen on prompts the tune never saw, so
        its side effects (KL) are not measured where the fine-tune fixed the answers."""
        if config.directions is None:
            return None
        return direction_validation(prompts["text"], config.directions.validation_fraction)

    def is_fresh(self, context: StageContext) -> bool:
        info = models_dir() / str(self.tuned_spec(context.config)) / TUNE_INFO
        return info.is_file() and json.loads(info.read_text())["input_hash"] == context.hashes[self.name]

    @staticmethod
    def _plain_pool(tune: TuneConfig) -> pd.DataFrame:
        """The prompts the plain benign instructions are drawn from (empty without benign_sources)."""
        if not tune.benign_sources:
            return pd.DataFrame(columns=["id", "text", "kind", "category", "source", "split"])
        pools = [load_prompt_source(source, test_fraction=0.3) for source in tune.benign_sources]
        return pd.concat(pools).drop_duplicates("id").reset_index(drop=True)

    @staticmethod
    def _base_answers(context: StageContext, benign: pd.DataFrame) -> pd.DataFrame:
        """The base model's own greedy answers, cached per prompt (resumable; a later tune drawing other
        prompts from the same pool reuses them); the model is freed on return."""
        tune = context.config.tune
        assert tune is not None  # applies() guarantees it
        base = context.config.generation.load(EMBEDDED_BASE)

        def answer(chunk: pd.DataFrame) -> pd.DataFrame:
            answers = answer_table(base, chunk, max_new_tokens=tune.max_response_tokens,
                                   batch_size=context.config.generation.batch_size, desc="base answers")
            return answers.assign(complete=answers["n_new_tokens"] < tune.max_response_tokens)[
                ["prompt_id", "response", "complete"]]

        key = {"model": EMBEDDED_BASE, "max_new_tokens": tune.max_response_tokens,
               "dtype": context.config.generation.dtype_name}
        return map_by_id(benign, answer, cache=context.cache("base_answers", key, across_studies=True),
                         chunk_size=context.config.generation.chunk_size, desc="base answers")

    def run(self, context: StageContext) -> StageOutput:
        tune = context.config.tune
        assert tune is not None  # applies() guarantees it
        prompts = context.table("prompts").drop(columns="run_id")
        chosen = training_prompts(prompts, self._plain_pool(tune), tune, held_out=self._held_out(context.config, prompts))
        benign = chosen[chosen["kind"] != "toxic"].rename(columns={"prompt_id": "id"})
        answers = self._base_answers(context, benign)
        # A harmless prompt the base model itself refuses would teach over-refusal: leave it out.
        base_refusals = answers["response"].map(is_refusal)
        logger.info("Left out %d of %d benign prompts: the base model refused them", int(base_refusals.sum()),
                    len(answers))
        toxic = chosen[chosen["kind"] == "toxic"]
        check_refusal_categories(tune, list(toxic["category"]))
        responses = pd.concat([
            pd.DataFrame({"prompt_id": toxic["prompt_id"].to_numpy(),
                          "response": [refusal_for(tune, category) for category in toxic["category"]],
                          "complete": True}),
            answers[~base_refusals.to_numpy()],
        ], ignore_index=True)
        data = chosen.merge(responses, on="prompt_id")
        balance = form_balance(list(data.loc[data["kind"] == "toxic", "text"]),
                               list(data.loc[data["kind"] != "toxic", "text"]))
        logger.info("Training set: %d toxic, %d benign (%d plain instructions); sentence-type gap %.2f, "
                    "opener distance %.2f", balance.n_a, balance.n_b,
                    int((~data["source"].isin(prompts["source"])).sum()), balance.max_type_gap,
                    balance.opener_distance)
        examples = [SftExample(r.text, r.response, bool(r.complete)) for r in rows_of(data)]
        target = models_dir() / str(self.tuned_spec(context.config))
        built = built_with(context.hashes[self.name])
        if built is not None and built != target:
            # Same inputs, same seeded weights: e.g. a tune-sweep point adopted as the study's setting.
            logger.info("Reusing %s: a tune with these exact inputs (hash %s)", built, context.hashes[self.name])
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(built, partial)
            shutil.rmtree(target, ignore_errors=True)
            partial.replace(target)
            losses = json.loads((target / TUNE_INFO).read_text())["losses"]
        else:
            result = fine_tune(export_embedded_base(), examples, tune, target)
            losses = list(result.losses)
            (target / TUNE_INFO).write_text(json.dumps({
                "input_hash": context.hashes[self.name], "seconds": result.seconds, "n_examples": result.n_examples,
                "losses": losses}))
            logger.info("Fine-tuned on %d examples in %.0f s (final loss %.3f)",
                        result.n_examples, result.seconds, losses[-1])
        steps = pd.DataFrame({"step": range(1, len(losses) + 1), "loss": losses})
        return StageOutput(
            tables={"tune_steps": steps,
                    "tune_data": data[["prompt_id", "text", "kind", "category", "source", "response", "complete"]]},
            models=(EMBEDDED_BASE, target.name),
        )
