"""Stage `tune`: build the safety-tuned demo model from the embedded base model.

Applies when the study uses the embedded tuned model and has a `tune:` section. The base
model's answers to the benign training prompts are generated in resumable chunks first.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd

from engine.chunked import map_in_chunks
from engine.generation import answer_table
from engine.judge import is_refusal
from engine.models import EMBEDDED_BASE, EMBEDDED_TUNED, export_embedded_base
from engine.paths import models_dir
from engine.tuning import SftExample, fine_tune
from precompute.config import StudyConfig
from precompute.pipeline import Stage, StageContext, StageOutput

logger = logging.getLogger(__name__)

TUNE_INFO = "tune_info.json"


class TuneStage(Stage):
    name = "tune"
    version = 2
    upstream = ("prompts",)
    runs_in_every_shard = False  # it saves the tuned model under data/models

    def applies(self, config: StudyConfig) -> bool:
        return config.tune is not None and EMBEDDED_TUNED in config.models.values()

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        return {"tune": config.section("tune"), "base": EMBEDDED_BASE, "dtype": config.generation.dtype_name}

    def is_fresh(self, context: StageContext) -> bool:
        info = models_dir() / EMBEDDED_TUNED / TUNE_INFO
        return info.is_file() and json.loads(info.read_text())["input_hash"] == context.hashes[self.name]

    @staticmethod
    def _base_answers(context: StageContext, benign: pd.DataFrame) -> pd.DataFrame:
        """The base model's own greedy answers (resumable chunks; the model is freed on return)."""
        tune = context.config.tune
        base = context.config.generation.load(EMBEDDED_BASE)

        def answer(chunk: pd.DataFrame) -> pd.DataFrame:
            answers = answer_table(base, chunk, max_new_tokens=tune.max_response_tokens,
                                   batch_size=context.config.generation.batch_size, desc="base answers")
            return answers.assign(complete=answers["n_new_tokens"] < tune.max_response_tokens)[
                ["prompt_id", "response", "complete"]]

        key = {"prompts": context.hashes["prompts"], "model": EMBEDDED_BASE,
               "max_new_tokens": tune.max_response_tokens, "dtype": context.config.generation.dtype_name}
        return map_in_chunks(benign, answer, cache=context.cache("base_answers", key),
                             chunk_size=context.config.generation.chunk_size, desc="base answers")

    def run(self, context: StageContext) -> StageOutput:
        tune = context.config.tune
        assert tune is not None  # applies() guarantees it
        prompts = context.table("prompts")
        train = prompts[prompts["split"] == "train"]
        benign = train[train["kind"] != "toxic"]
        answers = self._base_answers(context, benign)
        # A harmless prompt the base model itself refuses would teach over-refusal: leave it out.
        base_refusals = answers["response"].map(is_refusal)
        logger.info("Left out %d benign prompts the base model refused", int(base_refusals.sum()))
        answers = answers[~base_refusals]
        toxic = train[train["kind"] == "toxic"]
        wanted = tune.toxic_share / (1 - tune.toxic_share) * len(benign)
        toxic = toxic.groupby("category").sample(frac=min(1.0, wanted / len(toxic)), random_state=tune.seed)
        data = pd.concat([
            pd.DataFrame({"prompt_id": toxic["id"].to_numpy(), "response": tune.refusal_text, "complete": True}),
            answers,
        ], ignore_index=True).merge(prompts[["id", "text", "kind", "category"]], left_on="prompt_id", right_on="id")
        examples = [SftExample(r.text, r.response, bool(r.complete)) for r in data.itertuples()]
        target = models_dir() / EMBEDDED_TUNED
        result = fine_tune(export_embedded_base(), examples, tune, target)
        (target / TUNE_INFO).write_text(json.dumps({"input_hash": context.hashes[self.name],
                                                    "seconds": result.seconds, "n_examples": result.n_examples}))
        logger.info("Fine-tuned on %d examples in %.0f s (final loss %.3f)",
                    result.n_examples, result.seconds, result.losses[-1])
        steps = pd.DataFrame({"step": range(1, result.n_steps + 1), "loss": result.losses})
        return StageOutput(
            tables={"tune_steps": steps,
                    "tune_data": data[["prompt_id", "kind", "category", "response", "complete"]]},
            models=(EMBEDDED_BASE, EMBEDDED_TUNED),
        )
