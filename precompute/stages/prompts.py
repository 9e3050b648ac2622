"""Stage `prompts`: load the configured prompt sources into the one `prompts` table."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from engine.data.prompt_sources import (
    BUILTIN_VARIANTS,
    REFUSAL_DIRECTION_FILES,
    advbench_file,
    load_prompt_source,
    refusal_direction_file,
)
from engine.data.prompts import NO_CATEGORY
from engine.errors import ExplorerError
from precompute.config import StudyConfig
from precompute.pipeline import Stage, StageContext, StageOutput, fingerprint_path

logger = logging.getLogger(__name__)

PATH_OPTIONS = ("path", "folder", "location")
REPEATED = "same text as a prompt of an earlier source"
NOT_CHOSEN = "category not in prompts.categories"


@dataclass(frozen=True)
class KeptPrompts:
    prompts: pd.DataFrame
    left_out: dict[str, int]  # reason -> prompts the sources loaded that the table does not hold


def kept_prompts(loaded: Sequence[pd.DataFrame], categories: Sequence[str] | None) -> KeptPrompts:
    """The sources' prompts as one table: each text once (its first source), the chosen categories
    (every one when `categories` is None) plus plainly safe prompts; every prompt left out counted."""
    combined = pd.concat(loaded, ignore_index=True)
    repeated = combined["id"].duplicated()
    combined = combined[~repeated]
    chosen = (combined["category"].isin([*categories, NO_CATEGORY]) if categories is not None
              else pd.Series(True, index=combined.index))
    left_out = {REPEATED: int(repeated.sum()), NOT_CHOSEN: int((~chosen).sum())}
    return KeptPrompts(combined[chosen].reset_index(drop=True), {k: v for k, v in left_out.items() if v})


def source_fingerprints(sources: Sequence[dict[str, Any]]) -> list[str]:
    """Content hashes of the local files behind each source, so edited files re-run the stage."""
    prints = []
    for source in sources:
        if source.get("type") == "builtin":
            prints.append(fingerprint_path(BUILTIN_VARIANTS[source.get("variant", "original")]))
        if source.get("type") == "refusal_direction":
            prints.extend(fingerprint_path(refusal_direction_file(source.get("folder", "auto"), stem))
                          for stem in source.get("files", REFUSAL_DIRECTION_FILES))
        if source.get("type") == "advbench" and str(source.get("path", "auto")) == "auto":
            prints.append(fingerprint_path(advbench_file("auto")))  # a local copy, or the download
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
        kept = kept_prompts(loaded, settings.categories)
        for reason, count in kept.left_out.items():
            logger.warning("Prompts: %d of %d loaded left out (%s)", count, sum(map(len, loaded)), reason)
        if kept.prompts.empty:
            raise ExplorerError(
                "The configured prompt sources give no prompts in the chosen categories.",
                "check prompts.sources and prompts.categories in the config.",
            )
        dataset = "+".join(sorted(kept.prompts["source"].unique()))
        return StageOutput(tables={"prompts": kept.prompts}, dataset=dataset, left_out=kept.left_out)
