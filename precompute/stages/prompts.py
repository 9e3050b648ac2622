"""Stage `prompts`: load the configured prompt sources into the one `prompts` table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from engine.errors import ExplorerError
from engine.prompt_sources import (
    BUILTIN_VARIANTS,
    REFUSAL_DIRECTION_FILES,
    load_prompt_source,
    refusal_direction_file,
)
from engine.prompts import NO_CATEGORY
from precompute.config import StudyConfig
from precompute.pipeline import Stage, StageContext, StageOutput, fingerprint_path

PATH_OPTIONS = ("path", "folder", "location")


def source_fingerprints(sources: Sequence[dict[str, Any]]) -> list[str]:
    """Content hashes of the local files behind each source, so edited files re-run the stage."""
    prints = []
    for source in sources:
        if source.get("type") == "builtin":
            prints.append(fingerprint_path(BUILTIN_VARIANTS[source.get("variant", "original")]))
        if source.get("type") == "refusal_direction":
            prints.extend(fingerprint_path(refusal_direction_file(source.get("folder", "auto"), stem))
                          for stem in source.get("files", REFUSAL_DIRECTION_FILES))
        for option in PATH_OPTIONS:
            value = source.get(option)
            if isinstance(value, str) and Path(value).exists():
                prints.append(fingerprint_path(Path(value)))
    return prints


class PromptsStage(Stage):
    name = "prompts"
    version = 1

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        return {"prompts": config.section("prompts"), "files": source_fingerprints(config.prompts.sources)}

    def run(self, context: StageContext) -> StageOutput:
        settings = context.config.prompts
        loaded = [load_prompt_source(s, test_fraction=settings.test_fraction) for s in settings.sources]
        prompts = pd.concat(loaded).drop_duplicates("id", keep="first")
        keep = set(settings.categories) | {NO_CATEGORY}
        prompts = prompts[prompts["category"].isin(keep)].reset_index(drop=True)
        if prompts.empty:
            raise ExplorerError(
                "The configured prompt sources give no prompts in the chosen categories.",
                "check prompts.sources and prompts.categories in the config.",
            )
        dataset = "+".join(sorted(prompts["source"].unique()))
        return StageOutput(tables={"prompts": prompts}, dataset=dataset)
