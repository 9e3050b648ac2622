"""Stage `generate`: every model answers the chosen splits; both judges score the answers.

Writes `generations` (one row per prompt x model: response, substring-judge label, refusal
score, `token_fit`: whether its answer was one the refusal tokens were read off), `refusal_tokens`
(what the score reads, per model), `judge_agreement` (on the other half of the answers only) and
`refusal_rates` (per model x category x kind, with Wilson 95% intervals).

Shardable: `run --shard K/N` answers one slice of the prompts; `merge` judges all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from engine.data.chunked import map_in_chunks
from engine.data.prompts import stable_split
from engine.errors import ExplorerError
from engine.judging.judge import find_refusal_tokens, judge_agreement, refusal_rate_table, refusal_score
from engine.judging.refusal_phrases import is_refusal
from engine.runtime.generation import answer_table
from engine.runtime.models import EMBEDDED_BASE, EMBEDDED_GGUF_FILE, LoadedModel, is_embedded_tuned
from engine.runtime.scoring import next_token_logprobs
from precompute.config import StudyConfig
from precompute.pipeline import ShardContext, ShardRound, Stage, StageContext, StageOutput, fingerprint_path
from precompute.shards import ShardSpec, in_shard

logger = logging.getLogger(__name__)


def token_fit_half(texts: pd.Series) -> np.ndarray:
    """A fixed half of the prompts (by a stable hash of the text): their answers choose the refusal tokens."""
    return np.array([stable_split("refusal tokens:" + text, 0.5) == "test" for text in texts], dtype=bool)


def model_fingerprint(spec: str) -> str:
    """What identifies a model's weights for the content hash (the tuned one is covered by
    the tune stage's hash, a local folder by its config and weight files' contents)."""
    if spec == EMBEDDED_BASE or is_embedded_tuned(spec):
        return f"{spec}:{EMBEDDED_GGUF_FILE}"
    path = Path(spec)
    if path.is_dir():
        return f"dir:{fingerprint_path(path)}"
    return f"hub:{spec}"


class GenerateStage(Stage):
    name = "generate"
    version = 2
    upstream = ("prompts", "tune")
    # Sharded, each shard writes its raw answers; the merge finds the refusal tokens over all of them
    # and scores every prompt (one forward pass each, no generation) before the aggregates.
    shardable = True
    shard_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {"answers": ("model", "prompt_id")}

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        return {
            "models": {role: model_fingerprint(spec) for role, spec in config.models.items()},
            "generation": config.section("generation"),
            "dtype": config.generation.dtype_name,
            "judge": config.section("judge"),
        }

    @staticmethod
    def _selected(context: StageContext) -> pd.DataFrame:
        """The prompts of the splits the config answers."""
        prompts = context.table("prompts").drop(columns="run_id")
        return prompts[prompts["split"].isin(context.config.generation.splits)].reset_index(drop=True)

    @staticmethod
    def _answers(context: StageContext, model: LoadedModel, role: str, spec: str, selected: pd.DataFrame,
                 shard: ShardSpec | None = None) -> pd.DataFrame:
        """Greedy answers (prompt_id, response, first_token_id, n_new_tokens), resumable by chunk."""
        settings = context.config.generation
        label = f"generate {role}" + (f" (shard {shard})" if shard else "")

        def answer(chunk: pd.DataFrame) -> pd.DataFrame:
            return answer_table(model, chunk, max_new_tokens=settings.max_new_tokens,
                                batch_size=settings.batch_size, desc=label)

        key = {"prompts": context.hashes["prompts"], "model": model_fingerprint(spec),
               "tune": context.hashes.get("tune") if is_embedded_tuned(spec) else None,
               "generation": context.config.section("generation")}
        if shard:
            key["shard"] = str(shard)  # chunk numbers count within the shard's own slice
        return map_in_chunks(selected, answer, cache=context.cache("answers", key),
                             chunk_size=settings.chunk_size, desc=label)

    @staticmethod
    def _judge(context: StageContext, model: LoadedModel, role: str, spec: str, answers: pd.DataFrame,
               selected: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
        """Both judges on one model's answers (in `selected`'s order): judged rows, refusal tokens
        and judge agreement."""
        config = context.config
        answers = answers.assign(refused=[is_refusal(text) for text in answers["response"]])
        # The refusal tokens are read off one half of the answers and the judges' agreement is measured on
        # the other, so the score is never checked on the answers it was fitted to.
        answers["token_fit"] = token_fit_half(selected["text"])
        fit = answers[answers["token_fit"]]
        found = find_refusal_tokens(model.tokenizer, fit["first_token_id"].tolist(), fit["refused"].tolist(),
                                    min_share=config.judge.min_share, enrichment=config.judge.enrichment)
        logger.info("%s refusal tokens (%s): %s", role, found.source, list(found.tokens))
        logprobs = next_token_logprobs(model, list(selected["text"]), token_ids=found.token_ids,
                                       batch_size=config.generation.batch_size)
        answers["refusal_score"] = refusal_score(logprobs)
        answers["refused_by_score"] = answers["refusal_score"] > 0
        frame = answers.assign(model=role, model_spec=spec, condition="baseline").merge(
            selected[["id", "category", "kind", "split"]], left_on="prompt_id", right_on="id").drop(columns="id")
        tokens = pd.DataFrame({"model": role, "token_id": found.token_ids, "token": found.tokens,
                               "share_of_refusals": found.share_of_refusals, "source": found.source})
        held = frame[~frame["token_fit"]]
        agreements = [
            {"model": role, "kind": kind, "prompts": "held out from the token search",
             **judge_agreement(group["refused"].tolist(), group["refusal_score"].tolist()).__dict__}
            for kind, group in [("all", held), *held.groupby("kind")]
        ]
        return frame, tokens, agreements

    def _output(self, context: StageContext, answers_of: Callable[[LoadedModel, str, str], pd.DataFrame],
                selected: pd.DataFrame) -> StageOutput:
        """Judge every model's answers (one model in memory at a time) into the stage's tables."""
        config = context.config
        frames: list[pd.DataFrame] = []
        tokens: list[pd.DataFrame] = []
        agreements = []
        for role, spec in config.models.items():
            model = config.generation.load(spec)
            frame, found, agreement = self._judge(context, model, role, spec, answers_of(model, role, spec), selected)
            del model  # freed before the next one loads
            frames.append(frame)
            tokens.append(found)
            agreements.extend(agreement)
        generations = pd.concat(frames, ignore_index=True)
        generations["refusal_score"] = generations["refusal_score"].astype(np.float64)
        return StageOutput(
            tables={
                "generations": generations,
                "refusal_tokens": pd.concat(tokens, ignore_index=True),
                "judge_agreement": pd.DataFrame(agreements),
                "refusal_rates": refusal_rate_table(generations, ["model", "category", "kind"]),
            },
            models=tuple(config.models.values()),
            dataset="+".join(sorted(context.table("prompts")["source"].unique())),
        )

    def run(self, context: StageContext) -> StageOutput:
        selected = self._selected(context)
        return self._output(
            context, lambda model, role, spec: self._answers(context, model, role, spec, selected), selected)

    def run_shard(self, context: ShardContext, shard: ShardSpec, current: ShardRound) -> dict[str, pd.DataFrame]:
        selected = self._selected(context)
        selected = selected[in_shard(selected["id"], shard)].reset_index(drop=True)
        answers: list[pd.DataFrame] = []
        for role, spec in context.config.models.items():
            model = context.config.generation.load(spec)
            answers.append(self._answers(context, model, role, spec, selected, shard).assign(model=role))
            del model
        return {"answers": pd.concat(answers, ignore_index=True)}

    def merge_shards(self, context: StageContext, tables: Mapping[str, pd.DataFrame],
                     current: ShardRound) -> StageOutput:
        selected = self._selected(context)
        answers = tables["answers"]
        for role in context.config.models:
            held = answers.loc[answers["model"] == role, "prompt_id"]
            if len(held) != len(selected) or not held.isin(selected["id"]).all():
                raise ExplorerError(
                    f"The shards hold {len(held)} answers of {role}, but the study answers {len(selected)} prompts.",
                    "run every shard with the same config and N (delete the store's .shards folder to start over).")

        def answers_of(model: LoadedModel, role: str, spec: str) -> pd.DataFrame:
            own = answers[answers["model"] == role].drop(columns="model")
            return selected[["id"]].merge(own, left_on="id", right_on="prompt_id").drop(columns="id")  # prompt order

        return self._output(context, answers_of, selected)
