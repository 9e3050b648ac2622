"""The store: atomic per-stage writes, read-only readers, and clear errors for foreign files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from engine.data import store
from engine.errors import ExplorerError


def _run(stage: str = "prompts") -> store.RunRecord:
    return store.RunRecord(study="t", stage=stage, models=("m",), dataset="d", config={"a": 1})


def _write(path: Path, values: list[int], stage: str = "prompts") -> store.RunRecord:
    run = _run(stage)
    store.write_stage(path, run=run, input_hash=f"h{len(values)}",
                      tables={"numbers": pd.DataFrame({"x": values}), "other": pd.DataFrame({"y": ["a"]})})
    return run


def test_write_then_read_back_with_run_ids(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    run = _write(path, [1, 2, 3])
    numbers = store.read_table(path, "numbers")
    assert numbers["x"].tolist() == [1, 2, 3] and set(numbers["run_id"]) == {run.run_id}
    assert store.stage_hash(path, "prompts") == "h3" and store.stage_hash(path, "generate") is None
    assert store.table_names(path) == {"numbers", "other"}
    with store.reading(path) as con:
        assert con.execute("SELECT stage, dataset FROM runs").fetchall() == [("prompts", "d")]


def test_rewrite_replaces_tables_and_keeps_run_history(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    _write(path, [1, 2, 3])
    _write(path, [4])
    assert store.read_table(path, "numbers")["x"].tolist() == [4]
    with store.reading(path) as con:
        assert con.execute("SELECT count(*) FROM runs").fetchone() == (2,)


def test_a_reader_open_across_a_swap_keeps_its_snapshot_and_a_new_one_sees_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    _write(path, [1, 2, 3])
    with store.reading(path) as before:
        _write(path, [4])  # swapped in while `before` holds the old file open
        with store.reading(path) as after:
            # A direct duckdb.connect here would get the process's cached instance of the old file.
            assert after.execute("SELECT list(x) FROM numbers").fetchone() == ([4],)
        cursor = store.snapshot_cursor(before)
        assert cursor.execute("SELECT list(x ORDER BY x) FROM numbers").fetchone() == ([1, 2, 3],)


def test_one_snapshot_serves_many_threads_through_cursors(tmp_path: Path) -> None:
    # The app shares one snapshot connection between all sessions' script threads.
    path = tmp_path / "s.duckdb"
    _write(path, list(range(100)))
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def reader(threshold: int) -> None:
        try:
            for _ in range(50):
                with store.snapshot_cursor(snapshot) as cursor:
                    results.append((threshold, cursor.execute("SELECT count(*) FROM numbers WHERE x >= ?",
                                                              [threshold]).fetchone()[0]))
        except BaseException as error:  # noqa: BLE001 (reported below, from the test's thread)
            errors.append(error)

    with store.reading(path) as snapshot:
        threads = [threading.Thread(target=reader, args=(threshold,)) for threshold in (0, 25, 50, 75)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors and len(results) == 200
    assert all(count == 100 - threshold for threshold, count in results)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import pandas as pd
    from engine.data import store
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[2] == "mid-transaction":
        store.code_version = die           # called after BEGIN, before the tables are written
    else:
        store.os.replace = die             # every table written, killed before the swap
    run = store.RunRecord(study="t", stage="prompts", models=(), dataset="d", config={})
    store.write_stage(sys.argv[1], run=run, input_hash="new",
                      tables={"numbers": pd.DataFrame({"x": [9, 9]}), "other": pd.DataFrame({"y": ["b"]})})
""")


@pytest.mark.parametrize("moment", ["mid-transaction", "before-swap"])
def test_killed_writer_leaves_previous_tables(tmp_path: Path, moment: str) -> None:
    path = tmp_path / "s.duckdb"
    _write(path, [1, 2, 3])
    killed = subprocess.run([sys.executable, "-c", KILLER, str(path), moment], capture_output=True, check=False)
    assert killed.returncode == -9
    assert store.read_table(path, "numbers")["x"].tolist() == [1, 2, 3]
    assert store.stage_hash(path, "prompts") == "h3"
    _write(path, [5])  # the next writer cleans up the dead one's scratch file
    assert store.read_table(path, "numbers")["x"].tolist() == [5]
    assert not path.with_name(path.name + ".writing").exists()


def test_failed_write_leaves_previous_tables(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    _write(path, [1])
    with pytest.raises(ValueError, match="not allowed"):
        store.write_stage(path, run=_run(), input_hash="x", tables={"runs": pd.DataFrame({"x": [1]})})
    assert store.read_table(path, "numbers")["x"].tolist() == [1]


def test_reader_keeps_its_snapshot_while_a_writer_swaps(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    _write(path, [1])
    with store.reading(path) as con:
        _write(path, [2, 2])  # a read-only reader does not block the writer
        assert con.execute("SELECT x FROM numbers").fetchall() == [(1,)]
    assert store.read_table(path, "numbers")["x"].tolist() == [2, 2]


def test_not_a_duckdb_file(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    path.write_text("hello, I am a text file")
    with pytest.raises(ExplorerError, match="not a readable DuckDB store"):
        store.connect_readonly(path)
    with pytest.raises(ExplorerError, match="not a readable DuckDB store"):
        _write(path, [1])  # and the writer refuses to clobber it
    assert path.read_text() == "hello, I am a text file"


def test_foreign_duckdb_and_newer_schema(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.duckdb"
    with duckdb.connect(str(foreign)) as con:
        con.execute("CREATE TABLE t (x INT)")
    with pytest.raises(ExplorerError, match="not a study store"):
        store.connect_readonly(foreign)
    newer = tmp_path / "newer.duckdb"
    _write(newer, [1])
    with duckdb.connect(str(newer)) as con:
        con.execute("UPDATE store_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(ExplorerError, match="schema v99, newer than this code's v1"):
        store.read_table(newer, "numbers")


def test_missing_store_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(ExplorerError, match="python -m precompute run"):
        store.connect_readonly(tmp_path / "none.duckdb")


def test_float32_columns_are_stored_as_double(tmp_path: Path) -> None:
    import numpy as np

    path = tmp_path / "s.duckdb"
    store.write_stage(path, run=_run("prompts"), input_hash="h",
                      tables={"numbers": pd.DataFrame({"x": np.array([0.1, 0.2], dtype=np.float32)})})
    with store.reading(path) as con:
        assert con.execute("SELECT data_type FROM information_schema.columns WHERE column_name = 'x'").fetchall() \
            == [("DOUBLE",)]
