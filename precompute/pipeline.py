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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from engine.data import schema, store
from engine.data.paths import cache_dir
from engine.errors import ExplorerError
from precompute import progress, shards
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
    left_out: Mapping[str, int] = field(default_factory=dict)  # reason -> input rows the tables leave out


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

    def cache(self, name: str, key: Mapping[str, Any], *, across_studies: bool = False) -> Path:
        """A scratch folder for resumable work, unique to `key`: everything the work depends
        on, and nothing more, so a change elsewhere in the stage does not redo it. `across_studies`:
        one folder for every study (work that depends on nothing study-specific, such as the
        embedded base model's answers)."""
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cache_dir() / ("shared" if across_studies else self.config.study) / name / digest

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
    """Inside one shard: upstream stages the store does not hold are computed in memory, never
    written to the store, so N shards running at once never write the same file."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    until_written: ExitStack = field(default_factory=ExitStack)

    def table(self, name: str) -> pd.DataFrame:
        return self.tables[name] if name in self.tables else super().table(name)

    def partition_scratch(self, name: str, key: Mapping[str, Any]) -> Path:
        """A `scratch` folder kept until the shard's partition is written (for arrays it returns
        memory-mapped from a file there), removed afterwards, also on failure."""
        return self.until_written.enter_context(self.scratch(name, key))

    @property
    def available(self) -> set[str]:
        return set(self.tables) | super().available


@dataclass(frozen=True)
class ShardRound:
    """Which round of a sharded stage runs, with the merged tables of the rounds before it."""

    name: str
    earlier: Mapping[str, pd.DataFrame]
    last: bool
    input_hash: str  # the stage's, plus the earlier rounds' merged results


class Stage:
    """One step of the study: reads config and upstream tables, returns the tables it owns."""

    name: str = ""
    version: int = 1  # bump when the stage's code changes what it writes
    upstream: tuple[str, ...] = ()
    # Works prompt by prompt: can run on one slice of the prompts (`run_shard`) and merge all slices
    # (`merge_shards`); `shard_keys` names each per-prompt table's row key.
    shardable: bool = False
    shard_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    # A stage whose per-prompt work needs a result of every prompt first (directions: the chosen
    # direction) shards in rounds: each earlier round is merged beside the partitions and read by
    # the next round's shards; the last round is merged into the store.
    shard_rounds: ClassVar[tuple[str, ...]] = ("",)
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

    def run_shard(self, context: ShardContext, shard: ShardSpec, current: ShardRound) -> dict[str, pd.DataFrame]:
        """The rows the prompts in `shard` give in round `current` (per-prompt rows, or partial sums)."""
        raise NotImplementedError

    def merge_shards(self, context: StageContext, tables: Mapping[str, Any],
                     current: ShardRound) -> StageOutput:
        """Round `current`'s result from every shard's rows: for the last round the stage's output,
        as `run` would have made it; for an earlier one the tables the next round's shards read.
        `tables` holds DataFrames, and for a stage whose shards write arrays, each array as one
        memory map per shard (`shards.read_partitions`)."""
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


def _check_declared(stage: Stage, output: StageOutput) -> None:
    """Refuse, before anything is written, a table engine/data/schema.py does not list for the stage: the app
    names the stage that builds a missing table from that list."""
    if undeclared := schema.undeclared_tables(stage.name, output.tables):
        raise ExplorerError(
            f"Stage {stage.name} wrote table(s) {', '.join(undeclared)}, which engine/data/schema.py does not declare "
            "for it.", f"add them to STAGE_TABLES[{stage.name!r}] in engine/data/schema.py.")


def _store_output(config: StudyConfig, stage: Stage, output: StageOutput, digest: str, planned: list[str]) -> None:
    """The one place a stage's tables reach the store: a whole run and the last round of a shard merge."""
    _check_declared(stage, output)
    run = store.RunRecord(
        study=config.study, stage=stage.name, models=output.models, dataset=output.dataset,
        config={name: config.section(name) for name in SECTIONS} | {"models": config.models}
        | ({"left_out": dict(output.left_out)} if output.left_out else {}),
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
    command: str = "",
) -> list[StageReport]:
    """Run stages in order (up to and including `until`), re-running those in `force`, and keep the
    store's progress record (precompute.progress) up to date; `command` is the one that resumes this build."""
    stages = list(stages)
    _check_stage_names(stages, [*force, *([until] if until else [])])
    context = StageContext(config=config)
    planned = _planned(stages, config)
    reports: list[StageReport] = []
    with progress.recording(config.store, planned, command=command,
                            conditions=progress.build_conditions(config.generation.dtype_name)) as record:
        for stage in stages:
            record.start(stage.name)
            reports.append(_run_stage(stage, context, force=force, planned=planned))
            record.finish(stage.name, reports[-1].status, reports[-1].seconds)
            if stage.name == until:
                break
    return reports


def _up_to_sharded(stages: list[Stage], config: StudyConfig, name: str | None) -> list[Stage]:
    """The stages up to and including the one to shard: `name`, or else the first shardable stage
    the store does not hold up to date (so an array job after each merge shards the next one)."""
    shardable = [s.name for s in stages if s.shardable and s.applies(config)]
    if not shardable:
        raise ExplorerError("No stage of this config works prompt by prompt, so none can be sharded.",
                            "run it without --shard.")
    if name is not None and name not in shardable:
        _check_stage_names(stages, [name])
        raise ExplorerError(f"Stage {name} cannot be sharded with this config.",
                            f"shard one of {', '.join(shardable)}, or run {name} without --shard.")
    hashes: dict[str, str] = {}
    for index, stage in enumerate(stages):
        if not stage.applies(config):
            continue
        hashes[stage.name] = input_hash(stage, config, hashes)
        if stage.name == name or (name is None and stage.shardable
                                  and store.stage_hash(config.store, stage.name) != hashes[stage.name]):
            return stages[: index + 1]
    return []


def _current_round(config: StudyConfig, stage: Stage, digest: str) -> ShardRound:
    """The first round whose merged result is not on disk (the last round merges into the store)."""
    earlier: dict[str, pd.DataFrame] = {}
    round_hash, merged_so_far = digest, hashlib.sha256(digest.encode())
    for index, name in enumerate(stage.shard_rounds):
        last = index == len(stage.shard_rounds) - 1
        if index:  # a later round's partitions depend on what the earlier rounds merged into
            merged_so_far.update(name.encode())
            round_hash = merged_so_far.hexdigest()[:16]
        folder = shards.merged_dir(config.store, stage.name, name)
        if last or shards.partition_hash(folder) != round_hash:
            return ShardRound(name, earlier, last, round_hash)
        earlier.update(shards.read_tables(folder))
        merged_so_far.update(fingerprint_path(folder).encode())
    raise AssertionError("unreachable: the last round always returns")


def shard_progress(config: StudyConfig, stage: Stage, digest: str) -> str:
    """Which shards of a stage's current round are done, e.g. "round select: 3 of 8 shards done,
    missing 2/8, 5/8, ..." ("" when none has run)."""
    current = _current_round(config, stage, digest)
    label = f"round {current.name}: " if current.name else ""
    parts = []
    for count, done in shards.finished_shards(config.store, stage.name, current.name, current.input_hash).items():
        missing = [f"{k}/{count}" for k in range(1, count + 1) if k not in done]
        parts.append(f"{len(done)} of {count} shards done" + (f", missing {', '.join(missing)}" if missing
                                                                else f", ready to merge (merge --shards {count})"))
    return label + "; ".join(parts) if parts else ""


def _stored_upstream(stage: Stage, context: StageContext, target: Stage) -> bool:
    """Whether the store holds a stage before the sharded one up to date; if not, it must run in
    memory inside the shard, and a stage that cannot is named with the fix."""
    digest = input_hash(stage, context.config, context.hashes)
    context.hashes[stage.name] = digest
    if store.stage_hash(context.config.store, stage.name) == digest and stage.is_fresh(context):
        return True
    if stage.shardable:
        raise ExplorerError(
            f"Stage {target.name} reads stage {stage.name}, which the store does not hold up to date.",
            f"shard and merge {stage.name} first (`run --shard K/N --stage {stage.name}` for every K, then "
            f"`merge --stage {stage.name} --shards N`).")
    if not stage.runs_in_every_shard:
        raise ExplorerError(f"Stage {stage.name} cannot run inside a shard: it writes files outside the store.",
                            f"run `python -m precompute run --until {stage.name}` first (one job, not sharded), "
                            f"or drop its `{stage.name}:` section.")
    return False


def run_shard(
    config: StudyConfig, stages: Iterable[Stage], shard: ShardSpec, *, force: frozenset[str] = frozenset(),
    stage_name: str | None = None,
) -> list[StageReport]:
    """Run a sharded stage (`stage_name`, or the first not yet merged) on the prompts of `shard`
    only, into its parquet partition for the stage's current round.

    The stages before it come from the store when it holds them up to date; otherwise they are
    recomputed in memory (the store is not written, so shards can run at once). A partition already
    made with the same inputs is kept unless the stage is in `force`. The stages after it need every
    prompt: they run after `merge_shards`.
    """
    stages = list(stages)
    _check_stage_names(stages, force)
    chain = _up_to_sharded(stages, config, stage_name)
    if not chain:
        logger.info("Every sharded stage of this config is merged and up to date: nothing to shard.")
        return []
    *before, stage = chain
    context = ShardContext(config=config)
    reports: list[StageReport] = []
    for upstream in before:
        if not upstream.applies(config):
            reports.append(StageReport(upstream.name, "not applicable", 0.0))
            continue
        started = time.perf_counter()
        if _stored_upstream(upstream, context, stage):
            reports.append(StageReport(upstream.name, "stored", 0.0, context.hashes[upstream.name]))
            continue
        output = upstream.run(context)
        context.tables.update({name: frame.assign(run_id=shard.folder_name) for name, frame in output.tables.items()})
        reports.append(StageReport(upstream.name, "ran in memory", time.perf_counter() - started,
                                   context.hashes[upstream.name]))
    digest = input_hash(stage, config, context.hashes)
    context.hashes[stage.name] = digest
    current = _current_round(config, stage, digest)
    label = f"Stage {stage.name}" + (f", round {current.name}" if current.name else "") + f", shard {shard}"
    started = time.perf_counter()
    folder = shards.partition_dir(config.store, stage.name, shard, current.name)
    if shards.partition_hash(folder) == current.input_hash and stage.name not in force:
        logger.info("%s: unchanged (%s), skipped", label, current.input_hash)
        reports.append(StageReport(stage.name, "skipped", 0.0, current.input_hash))
        return reports
    logger.info("%s: running (inputs %s)", label, current.input_hash)
    with context.until_written:
        shards.write_partition(folder, stage=stage.name, shard=shard, input_hash=current.input_hash,
                               tables=stage.run_shard(context, shard, current))
    logger.info("%s: written to %s", label, folder)
    reports.append(StageReport(stage.name, "ran" if current.last else f"ran round {current.name}",
                               time.perf_counter() - started, current.input_hash))
    return reports


def merge_shards(config: StudyConfig, stages: Iterable[Stage], count: int, *, rerun: str,
                 stage_name: str | None = None) -> list[StageReport]:
    """Run the stages before the sharded one as usual, then merge its `count` partitions of the
    current round: the last round into the store, an earlier one beside the partitions for the next
    round's shards.

    `rerun` is the command that makes one shard, with `{shard}` for K/N (named in errors)."""
    if count < 1:
        raise ExplorerError(f"--shards {count} is not a shard count.", "pass the N of the shards' K/N, e.g. --shards 8.")
    stages = list(stages)
    chain = _up_to_sharded(stages, config, stage_name)
    if not chain:
        raise ExplorerError("Every sharded stage of this config is already merged and up to date.",
                            "run the remaining stages with `python -m precompute run`.")
    *before, stage = chain
    context = StageContext(config=config)
    planned = _planned(stages, config)
    reports = []
    for upstream in before:
        if upstream.shardable and upstream.applies(config):
            _stored_upstream(upstream, context, stage)  # raises unless merged: a sharded stage never runs whole here
        reports.append(_run_stage(upstream, context, force=frozenset(), planned=planned))
    digest = input_hash(stage, config, context.hashes)
    context.hashes[stage.name] = digest
    current = _current_round(config, stage, digest)
    started = time.perf_counter()
    tables = shards.read_partitions(config.store, stage.name, count, input_hash=current.input_hash,
                                    keys=stage.shard_keys, rerun=rerun.format(shard="{shard}", stage=stage.name),
                                    round_name=current.name)
    label = f"Stage {stage.name}" + (f", round {current.name}," if current.name else "")
    logger.info("%s merging %d shards (%s)", label, count,
                ", ".join(f"{name} {len(frame)} rows" for name, frame in tables.items()))
    output = stage.merge_shards(context, tables, current)
    if current.last:
        _store_output(config, stage, output, digest, planned)
    else:
        folder = shards.merged_dir(config.store, stage.name, current.name)
        shards.write_partition(folder, stage=stage.name, shard="merged", input_hash=current.input_hash,
                               tables=output.tables)
        logger.info("%s merged into %s: now run the %d shards again for its next round, then merge again.",
                    label, folder, count)
    seconds = time.perf_counter() - started
    logger.info("%s merged in %.1f s", label, seconds)
    reports.append(StageReport(stage.name, "merged" if current.last else f"merged round {current.name}",
                               seconds, digest))
    return reports
