"""The study store: one DuckDB file per study, written atomically per stage.

A stage's write copies the store, writes all of the stage's tables and its bookkeeping row in
one transaction, checkpoints, and swaps the copy in with an atomic rename. A killed writer
therefore leaves the previous good file untouched, and readers (read-only connections, which
may hold the old file open) never see a half-written table nor block the writer. A lock file
serialises writers.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from engine.data.paths import REPO_ROOT
from engine.errors import ExplorerError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

CREATE_META = "CREATE TABLE IF NOT EXISTS store_meta (key VARCHAR PRIMARY KEY, value VARCHAR)"
CREATE_RUNS = """
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, created_at TIMESTAMP, study VARCHAR, stage VARCHAR,
    models VARCHAR, dataset VARCHAR, config VARCHAR, code_version VARCHAR, schema_version INTEGER)
"""
CREATE_STAGES = """
CREATE TABLE IF NOT EXISTS stages (
    stage VARCHAR PRIMARY KEY, input_hash VARCHAR, run_id VARCHAR, finished_at TIMESTAMP,
    tables VARCHAR)
"""
UPSERT_META = "INSERT OR REPLACE INTO store_meta VALUES (?, ?)"
INSERT_RUN = "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
UPSERT_STAGE = "INSERT OR REPLACE INTO stages VALUES (?, ?, ?, ?, ?)"
SELECT_SCHEMA_VERSION = "SELECT value FROM store_meta WHERE key = 'schema_version'"
STUDY_STAGES_KEY = "study_stages"  # the stages that apply to the study's config, as a JSON list
SELECT_STAGE_HASH = "SELECT input_hash FROM stages WHERE stage = ?"
SELECT_TABLES = """
SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database() AND table_schema = 'main'
"""
ATTACH_READ_ONLY = "ATTACH ? AS study (READ_ONLY)"
USE_STUDY = "USE study"

TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
BOOKKEEPING_TABLES = frozenset({"store_meta", "runs", "stages"})


def code_version() -> str:
    """The git commit of the code that wrote a row ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class RunRecord:
    """One row of `runs`: which model, data, config and code produced a stage's tables."""

    study: str
    stage: str
    models: tuple[str, ...]
    dataset: str
    config: Mapping[str, object]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC).replace(tzinfo=None))


def _tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {row[0] for row in con.execute(SELECT_TABLES).fetchall()}


def study_tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The study's tables on an open connection or cursor (not the store's bookkeeping)."""
    return _tables(con) - BOOKKEEPING_TABLES


def _check_schema(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    tables = _tables(con)
    if "store_meta" not in tables:
        if tables:
            raise ExplorerError(
                f"{path} is a DuckDB file but not a study store (no store_meta table).",
                "pass a store made by `python -m precompute run`, or delete the file.",
            )
        return
    row = con.execute(SELECT_SCHEMA_VERSION).fetchone()
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise ExplorerError(
            f"{path} has store schema v{version}, newer than this code's v{SCHEMA_VERSION}.",
            "update this checkout (git pull) or rebuild the store with this version.",
        )


def connect_readonly(path: str | Path) -> duckdb.DuckDBPyConnection:
    """A validated read-only connection to the store file as it is now; the caller closes it.

    The file is attached to a private in-memory database rather than opened directly: DuckDB shares
    one database instance per path within a process, so a direct connection made while another is
    open would keep reading a file that precompute has since replaced. Query it, or its
    `snapshot_cursor`s, with unqualified table names."""
    path = Path(path)
    if not path.is_file():
        raise ExplorerError(
            f"Study store {path} does not exist.",
            "build it with `python -m precompute run --config precompute/configs/demo.yaml`.",
        )
    con = duckdb.connect(":memory:")
    try:
        con.execute(ATTACH_READ_ONLY, [str(path)])
        con.execute(USE_STUDY)
    except duckdb.Error as exc:
        con.close()
        raise ExplorerError(
            f"{path} is not a readable DuckDB store ({str(exc).splitlines()[0]}).",
            "pass a store made by `python -m precompute run`, or delete the file and rebuild.",
        ) from exc
    try:
        _check_schema(con, path)
    except ExplorerError:
        con.close()
        raise
    return con


def snapshot_cursor(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """A cursor on a `connect_readonly` connection, for one thread (DuckDB connections are not
    shared between threads; cursors of one are cheap and see the same file)."""
    cursor = con.cursor()
    cursor.execute(USE_STUDY)
    return cursor


@contextmanager
def reading(path: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    con = connect_readonly(path)
    try:
        yield con
    finally:
        con.close()


def table_names(path: str | Path) -> set[str]:
    with reading(path) as con:
        return study_tables(con)


def read_table(path: str | Path, name: str) -> pd.DataFrame:
    if not TABLE_NAME.match(name):
        raise ValueError(f"not a table name: {name!r}")
    with reading(path) as con:
        return con.execute(f"SELECT * FROM {name}").df()


def stage_hash(path: str | Path, stage: str) -> str | None:
    """The input hash the stage last completed with, or None if it never completed."""
    if not Path(path).is_file():
        return None
    with reading(path) as con:
        if "stages" not in _tables(con):
            return None
        row = con.execute(SELECT_STAGE_HASH, [stage]).fetchone()
        return row[0] if row else None


@contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_stage(
    path: str | Path, *, run: RunRecord, input_hash: str, tables: Mapping[str, pd.DataFrame],
    meta: Mapping[str, str] | None = None,
) -> None:
    """Replace a stage's tables and record it as done, atomically (copy, write, rename).

    Every row written gets the run's `run_id`, linking it to the `runs` row that made it. `meta`
    entries go to `store_meta` in the same transaction.
    """
    path = Path(path)
    for name in tables:
        if not TABLE_NAME.match(name) or name in BOOKKEEPING_TABLES:
            raise ValueError(f"stage table name not allowed: {name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _writer_lock(path):
        if path.exists():
            connect_readonly(path).close()  # refuse to overwrite a foreign or newer file
        scratch = path.with_name(f"{path.name}.writing")
        for stale in (scratch, scratch.with_name(scratch.name + ".wal")):
            stale.unlink(missing_ok=True)  # left by a writer that was killed
        if path.exists():
            shutil.copy2(path, scratch)
        con = duckdb.connect(str(scratch))
        try:
            con.execute("BEGIN TRANSACTION")
            for ddl in (CREATE_META, CREATE_RUNS, CREATE_STAGES):
                con.execute(ddl)
            for key, value in {"schema_version": str(SCHEMA_VERSION), **(meta or {})}.items():
                con.execute(UPSERT_META, [key, value])
            con.execute(
                INSERT_RUN,
                [
                    run.run_id, run.created_at, run.study, run.stage, json.dumps(run.models),
                    run.dataset, json.dumps(run.config, sort_keys=True, default=str),
                    code_version(), SCHEMA_VERSION,
                ],
            )
            for name, frame in tables.items():
                # DOUBLE, not FLOAT: float32 columns do not survive Streamlit's Arrow path to Vega charts.
                float32 = frame.select_dtypes("float32").columns
                frame = frame.astype(dict.fromkeys(float32, "float64"))
                con.register("incoming", frame.assign(run_id=run.run_id))
                con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM incoming")
                con.unregister("incoming")
            con.execute(
                UPSERT_STAGE,
                [run.stage, input_hash, run.run_id, run.created_at, json.dumps(sorted(tables))],
            )
            con.execute("COMMIT")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        with open(scratch, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(scratch, path)
    logger.info("Stored %s: %s", run.stage, ", ".join(f"{k} ({len(v)})" for k, v in tables.items()))


def rows_of(frame: pd.DataFrame) -> Iterable[Any]:
    """`frame.itertuples()` with untyped fields: pandas-stubs types each as any pandas scalar, missing
    values included, whatever its column holds."""
    return frame.itertuples()
