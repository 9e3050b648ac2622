"""Stage `generate`: every model answers the chosen splits; both judges score the answers.

Writes `generations` (one row per prompt x model: response, substring-judge label, refusal
score), `refusal_tokens` (what the score reads, per model), `judge_agreement` and
`refusal_rates` (per model x category x kind, with Wilson 95% intervals).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from engine.chunked import map_in_chunks
from engine.generation import answer_table
from engine.judge import find_refusal_tokens, is_refusal, judge_agreement, refusal_rate_table, refusal_score
from engine.models import EMBEDDED_BASE, EMBEDDED_GGUF_FILE, EMBEDDED_TUNED, load_model
from engine.scoring import next_token_logprobs
from precompute.config import StudyConfig
from precompute.pipeline import Stage, StageContext, StageOutput, fingerprint_path

logger = logging.getLogger(__name__)


def model_fingerprint(spec: str) -> str:
    """What identifies a model's weights for the content hash (the tuned one is covered by
    the tune stage's hash, a local folder by its config and weight files' contents)."""
    if spec in (EMBEDDED_BASE, EMBEDDED_TUNED):
        return f"{spec}:{EMBEDDED_GGUF_FILE}"
    path = Path(spec)
    if path.is_dir():
        return f"dir:{fingerprint_path(path)}"
    return f"hub:{spec}"


class GenerateStage(Stage):
    name = "generate"
    version = 1
    upstream = ("prompts", "tune")

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        return {
            "models": {role: model_fingerprint(spec) for role, spec in config.models.items()},
            "generation": config.section("generation"),
            "dtype": config.generation.dtype_name,
            "judge": config.section("judge"),
        }

    @staticmethod
    def _answer_and_judge(
        context: StageContext, role: str, spec: str, selected: pd.DataFrame
    ) -> tuple[pd.DataFrame, pd.DataFrame, list[dict[str, Any]]]:
        """One model's judged answers, refusal tokens and judge agreement (the model is freed
        on return, before the next one loads)."""
        config, settings = context.config, context.config.generation
        model = load_model(spec, dtype=config.generation.torch_dtype)

        def answer(chunk: pd.DataFrame) -> pd.DataFrame:
            return answer_table(model, chunk, max_new_tokens=settings.max_new_tokens,
                                batch_size=settings.batch_size, desc=f"generate {role}")

        key = {"prompts": context.hashes["prompts"], "model": model_fingerprint(spec),
               "tune": context.hashes.get("tune") if spec == EMBEDDED_TUNED else None,
               "generation": config.section("generation")}
        answers = map_in_chunks(selected, answer, cache=context.cache("answers", key),
                                chunk_size=settings.chunk_size, desc=f"generate {role}")
        answers["refused"] = [is_refusal(text) for text in answers["response"]]
        found = find_refusal_tokens(model.tokenizer, answers["first_token_id"].tolist(), answers["refused"].tolist(),
                                    min_share=config.judge.min_share, enrichment=config.judge.enrichment)
        logger.info("%s refusal tokens (%s): %s", role, found.source, list(found.tokens))
        logprobs = next_token_logprobs(model, list(selected["text"]), token_ids=found.token_ids,
                                       batch_size=settings.batch_size)
        answers["refusal_score"] = refusal_score(logprobs)
        answers["refused_by_score"] = answers["refusal_score"] > 0
        frame = answers.assign(model=role, model_spec=spec, condition="baseline").merge(
            selected[["id", "category", "kind", "split"]], left_on="prompt_id", right_on="id").drop(columns="id")
        tokens = pd.DataFrame({"model": role, "token_id": found.token_ids, "token": found.tokens,
                               "share_of_refusals": found.share_of_refusals, "source": found.source})
        agreements = [
            {"model": role, "kind": kind, **judge_agreement(group["refused"].tolist(),
                                                            group["refusal_score"].tolist()).__dict__}
            for kind, group in [("all", frame), *frame.groupby("kind")]
        ]
        return frame, tokens, agreements

    def run(self, context: StageContext) -> StageOutput:
        config = context.config
        prompts = context.table("prompts").drop(columns="run_id")
        selected = prompts[prompts["split"].isin(config.generation.splits)].reset_index(drop=True)
        frames, tokens, agreements = [], [], []
        for role, spec in config.models.items():
            frame, found, agreement = self._answer_and_judge(context, role, spec, selected)
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
            dataset="+".join(sorted(prompts["source"].unique())),
        )
