"""Run a study's stages in order, skipping those whose inputs and config are unchanged.

Each stage declares the config it reads and the stages it reads from; its input hash covers
both (plus its own version and input files' contents), so a changed prompt file, config value
or upstream result re-runs it and everything downstream, and nothing else.

A per-prompt stage (`shardable`) can also run as N shards on separate machines (`run_shard`), each
writing a parquet partition, and be merged into the store afterwards (`merge_shards`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from engine import store
from engine.errors import ExplorerError
from engine.paths import cache_dir
from precompute import shards
from precompute.config import SECTIONS, StudyConfig
from precompute.shards import ShardSpec

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

    @contextmanager
    def scratch(self, name: str, key: Mapping[str, Any]) -> Iterator[Path]:
        """A `cache` folder for arrays only this run reads (tens of GB at OR-Bench scale), removed
        when the block ends, also when the stage fails."""
        folder = self.cache(name, key)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class ShardContext(StageContext):
    """Inside one shard: upstream stages' tables are computed in memory, never written to the
    store, so N shards running at once never write the same file."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def table(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    @property
    def available(self) -> set[str]:
        return set(self.tables)


class Stage:
    """One step of the study: reads config and upstream tables, returns the tables it owns."""

    name: str = ""
    version: int = 1  # bump when the stage's code changes what it writes
    upstream: tuple[str, ...] = ()
    # Works prompt by prompt: can run on one slice of the prompts (`run_shard`) and merge all slices
    # (`merge_shards`); `shard_keys` names each per-prompt table's row key.
    shardable: bool = False
    shard_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    # Upstream of a sharded stage, every shard recomputes this stage in memory; False for a stage
    # that writes files outside the store (N shards would write them at once).
    runs_in_every_shard: bool = True

    def applies(self, config: StudyConfig) -> bool:
        return True

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        raise NotImplementedError

    def is_fresh(self, context: StageContext) -> bool:
        """Whether artifacts outside the store (e.g. a model folder) still match the hash."""
        return True

    def run(self, context: StageContext) -> StageOutput:
        raise NotImplementedError

    def run_shard(self, context: StageContext, shard: ShardSpec) -> dict[str, pd.DataFrame]:
        """The per-prompt rows of the prompts in `shard` (tables named in `shard_keys`)."""
        raise NotImplementedError

    def merge_shards(self, context: StageContext, tables: Mapping[str, pd.DataFrame]) -> StageOutput:
        """The stage's output from every shard's per-prompt rows, as `run` would have made it."""
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
    status: str  # "ran", "skipped" (unchanged), "not applicable"; sharded: "ran in memory", "merged"
    seconds: float
    input_hash: str = ""


def _store_output(config: StudyConfig, stage: Stage, output: StageOutput, digest: str, planned: list[str]) -> None:
    run = store.RunRecord(
        study=config.study, stage=stage.name, models=output.models, dataset=output.dataset,
        config={name: config.section(name) for name in SECTIONS} | {"models": config.models},
    )
    store.write_stage(config.store, run=run, input_hash=digest, tables=output.tables,
                      meta={store.STUDY_STAGES_KEY: json.dumps(planned)})


def _run_stage(stage: Stage, context: StageContext, *, force: frozenset[str], planned: list[str]) -> StageReport:
    """Run one stage into the store, or skip it when its inputs are unchanged."""
    config = context.config
    if not stage.applies(config):
        return StageReport(stage.name, "not applicable", 0.0)
    digest = input_hash(stage, config, context.hashes)
    context.hashes[stage.name] = digest
    started = time.perf_counter()
    unchanged = store.stage_hash(config.store, stage.name) == digest
    if unchanged and stage.name not in force and stage.is_fresh(context):
        logger.info("Stage %s: unchanged (%s), skipped", stage.name, digest)
        return StageReport(stage.name, "skipped", 0.0, digest)
    logger.info("Stage %s: running (inputs %s)", stage.name, digest)
    _store_output(config, stage, stage.run(context), digest, planned)
    seconds = time.perf_counter() - started
    logger.info("Stage %s: done in %.1f s", stage.name, seconds)
    return StageReport(stage.name, "ran", seconds, digest)


def _check_stage_names(stages: list[Stage], names: Iterable[str]) -> None:
    known = [s.name for s in stages]
    for name in names:
        if name not in known:
            raise ExplorerError(f"Unknown stage {name!r}.", f"stages are: {', '.join(known)}.")


def _planned(stages: list[Stage], config: StudyConfig) -> list[str]:
    return [stage.name for stage in stages if stage.applies(config)]  # the app lists the ones not built yet


def run_pipeline(
    config: StudyConfig,
    stages: Iterable[Stage],
    *,
    force: frozenset[str] = frozenset(),
    until: str | None = None,
) -> list[StageReport]:
    """Run stages in order (up to and including `until`), re-running those in `force`."""
    stages = list(stages)
    _check_stage_names(stages, [*force, *([until] if until else [])])
    context = StageContext(config=config)
    planned = _planned(stages, config)
    reports: list[StageReport] = []
    for stage in stages:
        reports.append(_run_stage(stage, context, force=force, planned=planned))
        if stage.name == until:
            break
    return reports


def _up_to_sharded(stages: list[Stage], config: StudyConfig) -> list[Stage]:
    """The stages up to and including the first shardable one that applies to the config."""
    for index, stage in enumerate(stages):
        if stage.shardable and stage.applies(config):
            return stages[: index + 1]
    raise ExplorerError("No stage of this config works prompt by prompt, so none can be sharded.",
                        "run it without --shard.")


def run_shard(
    config: StudyConfig, stages: Iterable[Stage], shard: ShardSpec, *, force: frozenset[str] = frozenset()
) -> list[StageReport]:
    """Run the sharded stage on the prompts of `shard` only, into its parquet partition.

    The stages before it are recomputed in memory (the store is not written, so shards can run at
    once); a partition already made with the same inputs is kept unless the stage is in `force`.
    The stages after it need every prompt: they run after `merge_shards`.
    """
    stages = list(stages)
    _check_stage_names(stages, force)
    context = ShardContext(config=config)
    reports: list[StageReport] = []
    for stage in _up_to_sharded(stages, config):
        if not stage.applies(config):
            reports.append(StageReport(stage.name, "not applicable", 0.0))
            continue
        digest = input_hash(stage, config, context.hashes)
        context.hashes[stage.name] = digest
        started = time.perf_counter()
        if not stage.shardable:
            if not stage.runs_in_every_shard:
                raise ExplorerError(f"Stage {stage.name} cannot run inside a shard: it writes files outside the store.",
                                    f"run this config without --shard, or drop its `{stage.name}:` section.")
            output = stage.run(context)
            context.tables.update({name: frame.assign(run_id=shard.folder_name) for name, frame in output.tables.items()})
            reports.append(StageReport(stage.name, "ran in memory", time.perf_counter() - started, digest))
            continue
        folder = shards.partition_dir(config.store, stage.name, shard)
        if shards.partition_hash(folder) == digest and stage.name not in force:
            logger.info("Stage %s, shard %s: unchanged (%s), skipped", stage.name, shard, digest)
            reports.append(StageReport(stage.name, "skipped", 0.0, digest))
            continue
        logger.info("Stage %s, shard %s: running (inputs %s)", stage.name, shard, digest)
        shards.write_partition(folder, stage=stage.name, shard=shard, input_hash=digest,
                               tables=stage.run_shard(context, shard))
        logger.info("Stage %s, shard %s: written to %s", stage.name, shard, folder)
        reports.append(StageReport(stage.name, "ran", time.perf_counter() - started, digest))
    return reports


def merge_shards(config: StudyConfig, stages: Iterable[Stage], count: int, *, rerun: str) -> list[StageReport]:
    """Run the stages before the sharded one as usual, then merge its `count` partitions into the store.

    `rerun` is the command that makes one shard, with `{shard}` for K/N (named in errors)."""
    if count < 1:
        raise ExplorerError(f"--shards {count} is not a shard count.", "pass the N of the shards' K/N, e.g. --shards 8.")
    stages = list(stages)
    context = StageContext(config=config)
    planned = _planned(stages, config)
    *before, stage = _up_to_sharded(stages, config)
    reports = [_run_stage(s, context, force=frozenset(), planned=planned) for s in before]
    digest = input_hash(stage, config, context.hashes)
    context.hashes[stage.name] = digest
    started = time.perf_counter()
    tables = shards.read_partitions(config.store, stage.name, count, input_hash=digest, keys=stage.shard_keys,
                                    rerun=rerun)
    logger.info("Stage %s: merging %d shards (%s)", stage.name, count,
                ", ".join(f"{name} {len(frame)} rows" for name, frame in tables.items()))
    _store_output(config, stage, stage.merge_shards(context, tables), digest, planned)
    seconds = time.perf_counter() - started
    logger.info("Stage %s: merged in %.1f s", stage.name, seconds)
    reports.append(StageReport(stage.name, "merged", seconds, digest))
    return reports
