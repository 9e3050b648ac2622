"""Run a study's stages in order, skipping those whose inputs and config are unchanged.

Each stage declares the config it reads and the stages it reads from; its input hash covers
both (plus its own version and input files' contents), so a changed prompt file, config value
or upstream result re-runs it and everything downstream, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from engine import store
from engine.errors import ExplorerError
from engine.paths import cache_dir
from precompute.config import SECTIONS, StudyConfig

logger = logging.getLogger(__name__)


def fingerprint_path(path: Path) -> str:
    """Content hash of a file, or of a folder's files (names, sizes and bytes)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class StageOutput:
    tables: Mapping[str, pd.DataFrame]
    models: tuple[str, ...] = ()
    dataset: str = ""


@dataclass
class StageContext:
    config: StudyConfig
    hashes: dict[str, str] = field(default_factory=dict)  # input hash of every stage so far

    def table(self, name: str) -> pd.DataFrame:
        return store.read_table(self.config.store, name)

    @property
    def available(self) -> set[str]:
        """Tables the store holds so far (optional stages may not have run)."""
        return store.table_names(self.config.store) if self.config.store.exists() else set()

    def cache(self, name: str, key: Mapping[str, Any]) -> Path:
        """A scratch folder for resumable work, unique to `key`: everything the work depends
        on, and nothing more, so a change elsewhere in the stage does not redo it."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cache_dir() / self.config.study / name / digest


class Stage:
    """One step of the study: reads config and upstream tables, returns the tables it owns."""

    name: str = ""
    version: int = 1  # bump when the stage's code changes what it writes
    upstream: tuple[str, ...] = ()

    def applies(self, config: StudyConfig) -> bool:
        return True

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        raise NotImplementedError

    def is_fresh(self, context: StageContext) -> bool:
        """Whether artifacts outside the store (e.g. a model folder) still match the hash."""
        return True

    def run(self, context: StageContext) -> StageOutput:
        raise NotImplementedError


def input_hash(stage: Stage, config: StudyConfig, upstream_hashes: Mapping[str, str]) -> str:
    payload = {
        "stage": stage.name,
        "version": stage.version,
        "inputs": stage.inputs(config),
        "upstream": {name: upstream_hashes.get(name) for name in stage.upstream},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageReport:
    stage: str
    status: str  # "ran", "skipped" (unchanged) or "not applicable"
    seconds: float
    input_hash: str = ""


def run_pipeline(
    config: StudyConfig,
    stages: Iterable[Stage],
    *,
    force: frozenset[str] = frozenset(),
    until: str | None = None,
) -> list[StageReport]:
    """Run stages in order (up to and including `until`), re-running those in `force`."""
    stages = list(stages)
    names = [s.name for s in stages]
    for name in [*force, *([until] if until else [])]:
        if name not in names:
            raise ExplorerError(f"Unknown stage {name!r}.", f"stages are: {', '.join(names)}.")
    context = StageContext(config=config)
    planned = [stage.name for stage in stages if stage.applies(config)]  # the app lists the ones not built yet
    reports: list[StageReport] = []
    for stage in stages:
        if not stage.applies(config):
            reports.append(StageReport(stage.name, "not applicable", 0.0))
        else:
            digest = input_hash(stage, config, context.hashes)
            context.hashes[stage.name] = digest
            started = time.perf_counter()
            unchanged = store.stage_hash(config.store, stage.name) == digest
            if unchanged and stage.name not in force and stage.is_fresh(context):
                logger.info("Stage %s: unchanged (%s), skipped", stage.name, digest)
                reports.append(StageReport(stage.name, "skipped", 0.0, digest))
            else:
                logger.info("Stage %s: running (inputs %s)", stage.name, digest)
                output = stage.run(context)
                run = store.RunRecord(
                    study=config.study, stage=stage.name, models=output.models,
                    dataset=output.dataset,
                    config={name: config.section(name) for name in SECTIONS}
                    | {"models": config.models},
                )
                store.write_stage(config.store, run=run, input_hash=digest, tables=output.tables,
                                  meta={store.STUDY_STAGES_KEY: json.dumps(planned)})
                seconds = time.perf_counter() - started
                logger.info("Stage %s: done in %.1f s", stage.name, seconds)
                reports.append(StageReport(stage.name, "ran", seconds, digest))
        if stage.name == until:
            break
    return reports
