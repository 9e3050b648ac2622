"""Shards of a per-prompt stage: which prompts slice K of N holds, and its parquet partition on disk.

A shard's rows live beside the store in `<study>.shards/<stage>/[<round>/]shard-K-of-N/<table>.parquet`,
with a manifest that names the inputs' hash; a stage sharded in rounds keeps each earlier round's
merged result in `<round>/merged/`, read by the next round's shards. The manifest is written last
and removed first, so a partition is either complete and labelled with the inputs that made it, or
absent: re-running a shard replaces its own partition and nothing else, and a killed shard never
looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from engine.errors import ExplorerError

MANIFEST = "manifest.json"
SHARD_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
DUPLICATES_SQL = """
SELECT {keys}, count(*) AS copies FROM read_parquet(?) GROUP BY ALL HAVING count(*) > 1 ORDER BY copies DESC LIMIT 5
"""
READ_SQL = "SELECT * FROM read_parquet(?, union_by_name = true)"  # an empty shard may type columns differently


@dataclass(frozen=True)
class ShardSpec:
    """Slice `index` (1-based) of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.index <= self.count:
            raise ExplorerError(f"Shard {self.index}/{self.count} does not exist.",
                                "write K/N with 1 <= K <= N, e.g. --shard 1/8 ... --shard 8/8.")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def folder_name(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


def parse_shard(text: str) -> ShardSpec:
    """`K/N` as written on the command line (or by a scheduler's array index)."""
    match = SHARD_SPEC.match(text)
    if not match:
        raise ExplorerError(f"Shard spec {text!r} is not K/N.",
                            "write two whole numbers, e.g. --shard 3/8 (the third of eight shards).")
    return ShardSpec(int(match.group(1)), int(match.group(2)))


def in_shard(ids: pd.Series, shard: ShardSpec) -> np.ndarray:
    """Which ids slice `shard` holds: a stable hash of each id, modulo the shard count, so a
    prompt's shard depends on nothing but its id and N."""
    buckets = np.array([int(hashlib.sha256(str(i).encode()).hexdigest()[:8], 16) % shard.count for i in ids])
    return buckets == shard.index - 1


def stage_dir(store: Path, stage: str, round_name: str = "") -> Path:
    """The folder of one round's partitions (a one-round stage has no round folder)."""
    folder = store.parent / f"{store.stem}.shards" / stage
    return folder / round_name if round_name else folder


def partition_dir(store: Path, stage: str, shard: ShardSpec, round_name: str = "") -> Path:
    return stage_dir(store, stage, round_name) / shard.folder_name


def merged_dir(store: Path, stage: str, round_name: str) -> Path:
    """Where an earlier round's merged tables are kept for the next round's shards."""
    return stage_dir(store, stage, round_name) / "merged"


def partition_hash(folder: Path) -> str | None:
    """The input hash a complete partition was made with, or None if there is none."""
    manifest = folder / MANIFEST
    return json.loads(manifest.read_text())["input_hash"] if manifest.is_file() else None


def _replace_atomically(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _write_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle, so np.save adds no ".npy" to the partial name
        np.save(handle, array)


def write_partition(folder: Path, *, stage: str, shard: ShardSpec | str, input_hash: str,
                    tables: Mapping[str, pd.DataFrame | np.ndarray]) -> None:
    """Replace one shard's partition (or a round's merged tables, `shard="merged"`): tables (parquet)
    and arrays (.npy, e.g. activations) first, the manifest that vouches for them last."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    frames = {name: value for name, value in tables.items() if isinstance(value, pd.DataFrame)}
    arrays = {name: value for name, value in tables.items() if not isinstance(value, pd.DataFrame)}
    for name, frame in frames.items():
        _replace_atomically(folder / f"{name}.parquet", lambda path, f=frame: f.to_parquet(path, index=False))
    for name, array in arrays.items():
        _replace_atomically(folder / f"{name}.npy", lambda path, a=array: _write_array(path, a))
    manifest = {"stage": stage, "shard": str(shard), "input_hash": input_hash,
                "rows": {name: len(frame) for name, frame in frames.items()},
                "arrays": {name: list(array.shape) for name, array in arrays.items()}}
    _replace_atomically(folder / MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=1)))


def finished_shards(store: Path, stage: str, round_name: str, input_hash: str) -> dict[int, list[int]]:
    """Per shard count N found on disk, the K of the partitions complete and made with `input_hash`."""
    found: dict[int, list[int]] = {}
    folder = stage_dir(store, stage, round_name)
    for partition in sorted(folder.glob("shard-*-of-*")) if folder.is_dir() else []:
        match = re.fullmatch(r"shard-(\d+)-of-(\d+)", partition.name)
        if match and partition_hash(partition) == input_hash:
            found.setdefault(int(match.group(2)), []).append(int(match.group(1)))
    return {count: sorted(indices) for count, indices in sorted(found.items())}


def read_tables(folder: Path) -> dict[str, pd.DataFrame]:
    """The tables a complete partition's manifest lists."""
    rows = json.loads((folder / MANIFEST).read_text())["rows"]
    return {name: pd.read_parquet(folder / f"{name}.parquet") for name in rows}


def read_partitions(store: Path, stage: str, count: int, *, input_hash: str, keys: Mapping[str, tuple[str, ...]],
                    rerun: str, round_name: str = "") -> dict[str, pd.DataFrame | list[np.ndarray]]:
    """All N partitions of a stage's round, each table read across them by DuckDB, after checking
    that every shard is there, was made with `input_hash`, and no row key (`keys`, per table)
    appears twice. An array comes back as one read-only memory map per shard, in shard order.

    `rerun` is the command that makes a shard, with `{shard}` where K/N goes (for the fix)."""
    shards = [ShardSpec(k, count) for k in range(1, count + 1)]
    hashes = {shard: partition_hash(partition_dir(store, stage, shard, round_name)) for shard in shards}
    missing = [shard for shard, digest in hashes.items() if digest is None]
    stale = [shard for shard, digest in hashes.items() if digest not in (None, input_hash)]
    for problem, bad in (("is missing", missing), ("was made with other inputs (config, prompts or code)", stale)):
        if bad:
            names = ", ".join(str(shard) for shard in bad)
            which = f"stage {stage}" + (f", round {round_name}," if round_name else "")
            raise ExplorerError(
                f"shard {names} of {which} {problem} (in {stage_dir(store, stage, round_name)}).",
                "run " + " and ".join(f"`{rerun.format(shard=shard)}`" for shard in bad) + ", then merge again.")
    folders = [partition_dir(store, stage, shard, round_name) for shard in shards]
    manifests = [json.loads((folder / MANIFEST).read_text()) for folder in folders]
    tables: dict[str, pd.DataFrame | list[np.ndarray]] = {
        name: [np.load(folder / f"{name}.npy", mmap_mode="r") for folder in folders]
        for name in manifests[0].get("arrays", {})}
    with duckdb.connect() as con:
        for name in manifests[0]["rows"]:
            files = [str(folder / f"{name}.parquet") for folder, manifest in zip(folders, manifests, strict=True)
                     if manifest["rows"][name]]  # an empty shard's table may have no columns to read
            if not files:
                tables[name] = pd.concat([pd.read_parquet(folder / f"{name}.parquet") for folder in folders])
                continue
            key = keys.get(name)
            duplicated = key and con.execute(DUPLICATES_SQL.format(keys=", ".join(key)), [files]).fetchall()
            if duplicated:
                raise ExplorerError(
                    f"The shards of stage {stage} hold {name} rows more than once, e.g. {key} = {duplicated[0][:-1]} "
                    f"({duplicated[0][-1]} copies).",
                    f"delete {stage_dir(store, stage, round_name)} and run all {count} shards again "
                    "with the same N.")
            tables[name] = con.execute(READ_SQL, [files]).df()
    return tables
