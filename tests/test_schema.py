"""engine.data.schema, the study's one vocabulary (kinds, stages, each stage's tables), which the pipeline
enforces when it stores a stage; and engine.stats' Wilson interval, statsmodels' to the last bit."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from statsmodels.stats.proportion import proportion_confint

from engine.data import schema, store
from engine.errors import ExplorerError
from engine.stats import Z_95, wilson_interval
from precompute import pipeline
from precompute.config import StudyConfig, parse_config
from precompute.shards import ShardSpec
from precompute.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


def test_the_pipeline_runs_the_declared_stages_in_the_declared_order() -> None:
    assert tuple(stage.name for stage in STAGES) == schema.STAGE_ORDER


def _writers(path: Path) -> dict[str, set[str]]:
    """Each study table of a store, with the stages whose runs wrote its rows."""
    with store.reading(path) as con:
        return {table: {stage for (stage,) in con.execute(
                    f"SELECT DISTINCT r.stage FROM {table} JOIN runs r USING (run_id)").fetchall()}
                for table in store.study_tables(con)}


def test_every_table_a_tiny_study_stores_is_declared_for_its_stage(tiny_store: Path) -> None:
    writers = _writers(tiny_store)
    # The tiny study has no fine-tune section; tests/test_tuning.py stores the tune stage's tables.
    assert set().union(*writers.values()) == set(schema.STAGE_ORDER) - {"tune"}
    misplaced = {table: stages for table, stages in writers.items()
                 if table not in schema.TABLE_STAGE or not stages <= {schema.TABLE_STAGE[table]}}
    assert misplaced == {}


def _config(tmp_path: Path) -> StudyConfig:
    return parse_config({"study": "stray", "store": str(tmp_path / "stray.duckdb"), "models": {"base": "m"}})


class _WritesTables(pipeline.Stage):
    """A stage that writes the given tables: one row each."""

    def __init__(self, name: str, tables: tuple[str, ...]) -> None:
        self.name, self.tables = name, tables

    def inputs(self, config: StudyConfig) -> dict:
        return {}

    def output(self) -> pipeline.StageOutput:
        return pipeline.StageOutput(tables={table: pd.DataFrame({"id": ["a"]}) for table in self.tables})

    def run(self, context: pipeline.StageContext) -> pipeline.StageOutput:
        return self.output()


class _ShardedWritesTables(_WritesTables):
    shardable = True
    shard_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {"rows": ("id",)}

    def run_shard(self, context, shard: ShardSpec, current: pipeline.ShardRound) -> dict[str, pd.DataFrame]:
        return {"rows": pd.DataFrame({"id": [str(shard)]})}

    def merge_shards(self, context, tables: Mapping[str, pd.DataFrame],
                     current: pipeline.ShardRound) -> pipeline.StageOutput:
        return self.output()


@pytest.mark.parametrize(("name", "tables", "undeclared"), [
    ("prompts", ("prompts", "stray"), "stray"),  # a declared stage, one table too many
    ("stray", ("prompts",), "prompts"),  # a stage the schema does not know at all
])
def test_a_stage_writing_an_undeclared_table_is_refused_before_the_store_is_written(
        tmp_path: Path, name: str, tables: tuple[str, ...], undeclared: str) -> None:
    config = _config(tmp_path)
    with pytest.raises(ExplorerError, match=rf"Stage {name} wrote table\(s\) {undeclared}, which engine/data/schema.py "
                                            rf"does not declare for it\. Fix: add them to STAGE_TABLES\['{name}'\]"):
        pipeline.run_pipeline(config, [_WritesTables(name, tables)])
    assert not config.store.exists()


def test_a_sharded_merge_writing_an_undeclared_table_is_refused(tmp_path: Path) -> None:
    config, stage = _config(tmp_path), _ShardedWritesTables("circuits", ("circuits", "stray"))
    pipeline.run_shard(config, [stage], ShardSpec(1, 1))
    with pytest.raises(ExplorerError, match=r"Stage circuits wrote table\(s\) stray, which engine/data/schema.py"):
        pipeline.merge_shards(config, [stage], 1, rerun="run --shard {shard}")
    assert not config.store.exists()


def test_kinds_are_declared_once() -> None:
    from engine.data import prompts
    from precompute.config import CircuitsConfig

    assert prompts.KINDS is schema.KINDS and CircuitsConfig().kinds is schema.KINDS


@pytest.mark.parametrize(("refused", "n"), [(0, 10), (140, 145), (1, 1), (7, 13), (0, 1), (500, 1000), (3, 2000)])
def test_wilson_interval_is_statsmodels(refused: int, n: int) -> None:
    low, high = wilson_interval(refused, n)
    assert (float(low), float(high)) == proportion_confint(refused, n, alpha=0.05, method="wilson")


def test_wilson_interval_is_statsmodels_to_the_last_bit_on_arrays() -> None:
    # Every k of every n up to 300, as refusal_rate_table passes them: stored intervals stay as they were.
    n = np.repeat(np.arange(1, 301), np.arange(2, 302))
    refused = np.concatenate([np.arange(size + 1) for size in range(1, 301)])
    ours = wilson_interval(pd.Series(refused), pd.Series(n))
    theirs = proportion_confint(pd.Series(refused), pd.Series(n), alpha=0.05, method="wilson")
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(ours, theirs, strict=True))
    assert Z_95 == norm.isf(0.025)
    assert np.isnan(wilson_interval(0, 0)).all()  # no prompts: no interval
