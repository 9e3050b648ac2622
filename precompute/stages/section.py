"""The shape most analysis stages share: configured by the config section of their own name, run
on the study model that section names."""

from __future__ import annotations

from typing import Any

from precompute.config import StudyConfig
from precompute.pipeline import Stage
from precompute.stages.generate import model_fingerprint


class ModelSectionStage(Stage):
    """Runs when the config has a section named like the stage; its inputs are that section, the
    named model's fingerprint, and the batch size and dtype every forward pass uses."""

    def applies(self, config: StudyConfig) -> bool:
        return getattr(config, self.name) is not None

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        section = getattr(config, self.name)
        return {self.name: config.section(self.name), "model": model_fingerprint(config.models[section.model]),
                "batch_size": config.generation.batch_size, "dtype": config.generation.dtype_name}
