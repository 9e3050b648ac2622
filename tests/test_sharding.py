"""Sharded `generate`: slices, partitions, idempotent re-runs, and a merge equal to an unsharded run."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from engine.data import store
from engine.data.prompt_sources import load_builtin
from engine.errors import ExplorerError
from precompute import pipeline, shards
from precompute.__main__ import main
from precompute.config import parse_config
from precompute.shards import ShardSpec, in_shard, parse_shard
from precompute.stages import STAGES

RERUN = "python -m precompute run --config c.yaml --shard {shard}"
GENERATE_TABLES = ("generations", "refusal_tokens", "judge_agreement", "refusal_rates")


@pytest.fixture
def prompt_file(tmp_path: Path) -> Path:
    builtin = load_builtin()
    sample = pd.concat([builtin[builtin["kind"] != "safe"].groupby(["category", "kind"]).head(2),
                        builtin[builtin["kind"] == "safe"].head(16)])
    path = tmp_path / "prompts.csv"
    sample[["text", "category", "kind"]].to_csv(path, index=False)
    return path


def _raw(tmp_path: Path, model_dir: Path, prompt_file: Path, name: str = "sharded", **generation) -> dict:
    return {
        "study": "tiny", "store": str(tmp_path / f"{name}.duckdb"),
        "models": {"base": str(model_dir), "other": str(model_dir)},
        "prompts": {"sources": [{"type": "table", "path": str(prompt_file),
                                 "mapping": {"category": "category", "kind": "kind"}}]},
        "generation": {"max_new_tokens": 3, "batch_size": 8, "chunk_size": 8, "splits": ["train", "test"],
                       **generation},
    }


def _table(config, name: str) -> pd.DataFrame:
    frame = store.read_table(config.store, name).drop(columns="run_id")
    return frame.sort_values(list(frame.columns[:3])).reset_index(drop=True)


@pytest.mark.parametrize(("text", "message"), [
    ("9/8", "Shard 9/8 does not exist"), ("0/0", "Shard 0/0 does not exist"), ("0/8", "Shard 0/8 does not exist"),
    ("a/b", "Shard spec 'a/b' is not K/N"), ("3", "Shard spec '3' is not K/N"),
])
def test_bad_shard_spec_is_one_error_line(tmp_path, caplog, text, message) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("study: x\nmodels: {base: m}\n")
    with caplog.at_level(logging.ERROR, logger="precompute"):
        assert main(["run", "--config", str(config), "--shard", text]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "Fix: write" in errors[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--stage", "generate"], "--stage names the stage to shard, but no --shard K/N was given"),
    (["run", "--until", "sae"], "Unknown stage 'sae'"),
])
def test_stage_options_misused_are_one_error_line(tmp_path, caplog, argv, message) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("study: x\nmodels: {base: m}\n")
    with caplog.at_level(logging.ERROR, logger="precompute"):
        assert main([*argv, "--config", str(config)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and message in errors[0] and "Fix: " in errors[0]


def test_every_prompt_is_in_exactly_one_shard() -> None:
    assert parse_shard(" 3 / 8 ") == ShardSpec(3, 8)
    ids = pd.Series([f"{i:016x}" for i in range(4000)])
    membership = np.stack([in_shard(ids, ShardSpec(k, 8)) for k in range(1, 9)])
    assert (membership.sum(axis=0) == 1).all()
    assert membership.sum(axis=1).min() > 400  # roughly even slices (500 expected)
    assert (in_shard(ids[::-1], ShardSpec(2, 8))[::-1] == membership[1]).all()  # depends on the id only


def test_merged_shards_equal_an_unsharded_run(tmp_path, tiny_model_dir, prompt_file) -> None:
    whole = parse_config(_raw(tmp_path, tiny_model_dir, prompt_file, name="whole"))
    pipeline.run_pipeline(whole, STAGES)
    config = parse_config(_raw(tmp_path, tiny_model_dir, prompt_file))
    for k in (1, 2, 3):
        reports = pipeline.run_shard(config, STAGES, ShardSpec(k, 3))
        assert [(r.stage, r.status) for r in reports] == [
            ("prompts", "ran in memory"), ("tune", "not applicable"), ("generate", "ran")]
    assert not config.store.exists()  # shards never write the store
    partitions = sorted(p.name for p in (tmp_path / "sharded.shards" / "generate").iterdir())
    assert partitions == ["shard-1-of-3", "shard-2-of-3", "shard-3-of-3"]
    reports = pipeline.merge_shards(config, STAGES, 3, rerun=RERUN)
    assert [(r.stage, r.status) for r in reports] == [
        ("prompts", "ran"), ("tune", "not applicable"), ("generate", "merged")]
    for name in GENERATE_TABLES:
        pd.testing.assert_frame_equal(_table(config, name), _table(whole, name))
    assert len(_table(config, "generations")) == 2 * len(_table(config, "prompts"))
    # the later stages see the merged stage as done
    assert {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}["generate"] == "skipped"
    assert store.stage_hash(config.store, "generate") == store.stage_hash(whole.store, "generate")


def test_rerunning_a_shard_is_idempotent(tmp_path, tiny_model_dir, prompt_file) -> None:
    config = parse_config(_raw(tmp_path, tiny_model_dir, prompt_file))
    pipeline.run_shard(config, STAGES, ShardSpec(1, 2))
    folder = shards.partition_dir(config.store, "generate", ShardSpec(1, 2))
    first = pd.read_parquet(folder / "answers.parquet")
    assert pipeline.run_shard(config, STAGES, ShardSpec(1, 2))[-1].status == "skipped"
    assert pipeline.run_shard(config, STAGES, ShardSpec(1, 2), force=frozenset({"generate"}))[-1].status == "ran"
    assert sorted(p.name for p in folder.iterdir()) == ["answers.parquet", "manifest.json"]  # nothing left over
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "answers.parquet"), first)


def test_missing_stale_and_duplicated_shards_are_named(tmp_path, tiny_model_dir, prompt_file) -> None:
    raw = _raw(tmp_path, tiny_model_dir, prompt_file)
    config = parse_config(raw)
    pipeline.run_shard(config, STAGES, ShardSpec(1, 3))
    pipeline.run_shard(config, STAGES, ShardSpec(3, 3))
    with pytest.raises(ExplorerError, match=r"shard 2/3 of stage generate is missing.*Fix: run "
                                            r"`python -m precompute run --config c.yaml --shard 2/3`"):
        pipeline.merge_shards(config, STAGES, 3, rerun=RERUN)
    with pytest.raises(ExplorerError, match="shard 1/4, 2/4, 3/4, 4/4 of stage generate is missing"):
        pipeline.merge_shards(config, STAGES, 4, rerun=RERUN)
    longer = parse_config(_raw(tmp_path, tiny_model_dir, prompt_file, max_new_tokens=4))
    pipeline.run_shard(longer, STAGES, ShardSpec(2, 3))
    with pytest.raises(ExplorerError, match="shard 1/3, 3/3 of stage generate was made with other inputs"):
        pipeline.merge_shards(longer, STAGES, 3, rerun=RERUN)
    # a partition copied into another shard's place holds the same prompts twice
    one, two = (shards.partition_dir(config.store, "generate", ShardSpec(k, 3)) for k in (1, 2))
    shutil.copy(one / "answers.parquet", two / "answers.parquet")
    shutil.copy(one / "manifest.json", two / "manifest.json")
    with pytest.raises(ExplorerError, match=r"hold answers rows more than once, e\.g\. \('model', 'prompt_id'\)"):
        pipeline.merge_shards(config, STAGES, 3, rerun=RERUN)
    assert store.stage_hash(config.store, "generate") is None  # nothing merged


def test_cli_shards_and_merges(tmp_path, tiny_model_dir, prompt_file, caplog) -> None:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, tiny_model_dir, prompt_file)))
    assert main(["run", "--config", str(path), "--shard", "2/2"]) == 0
    with caplog.at_level(logging.INFO, logger="precompute"):
        assert main(["status", "--config", str(path)]) == 0
    assert "generate   missing (1 of 2 shards done, missing 1/2)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="precompute"):
        assert main(["merge", "--config", str(path), "--shards", "2"]) == 2
    assert f"run `python -m precompute run --config {path} --shard 1/2 --stage generate`" in caplog.text
    assert main(["run", "--config", str(path), "--shard", "1/2"]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="precompute"):
        assert main(["status", "--config", str(path)]) == 0
    assert "generate   missing (2 of 2 shards done, ready to merge (merge --shards 2))" in caplog.text
    assert main(["merge", "--config", str(path), "--shards", "2"]) == 0
    assert len(store.read_table(tmp_path / "sharded.duckdb", "generations")) > 0


def test_a_config_with_the_demo_fine_tune_cannot_be_sharded(tmp_path, tiny_model_dir, prompt_file) -> None:
    raw = _raw(tmp_path, tiny_model_dir, prompt_file) | {"tune": {"epochs": 1}}
    raw["models"] = {"base": "smollm2-135m-instruct", "tuned": "smollm2-135m-refusal"}  # as in the demo
    with pytest.raises(ExplorerError, match="Stage tune cannot run inside a shard"):
        pipeline.run_shard(parse_config(raw), STAGES, ShardSpec(1, 2))


FAITHFULNESS_TABLES = ("circuits", "circuit_faithfulness")  # hold faithfulness ratios


def _sorted(path: Path, name: str) -> pd.DataFrame:
    # where the trained SAEs are saved (named after the store) and how long training took differ
    frame = store.read_table(path, name).drop(columns=["run_id", "path", "train_seconds"], errors="ignore")
    keys = [c for c in frame.columns if frame[c].map(lambda v: isinstance(v, (str, int, float, bool))).all()]
    return frame.sort_values(keys).reset_index(drop=True)


def test_every_sharded_stage_merges_into_the_unsharded_study(tmp_path, tiny_model_dir, tiny_store) -> None:
    """Every sharded stage (directions in two rounds), each in 2 shards, gives the whole run's tables."""
    from conftest import tiny_study_settings

    config = parse_config(tiny_study_settings(tmp_path / "sharded.duckdb", tiny_model_dir))

    def shard_and_merge(stage: str, ran: str, merged: str) -> None:
        for k in (1, 2):
            assert [(r.stage, r.status) for r in pipeline.run_shard(config, STAGES, ShardSpec(k, 2))][-1] == (stage, ran)
        assert [(r.stage, r.status) for r in pipeline.merge_shards(config, STAGES, 2, rerun=RERUN)][-1] == (
            stage, merged)

    shard_and_merge("generate", "ran", "merged")
    shard_and_merge("directions", "ran round select", "merged round select")
    assert (tmp_path / "sharded.shards" / "directions" / "select" / "merged" / "manifest.json").is_file()
    assert store.stage_hash(config.store, "directions") is None  # the first round is not the stage's result
    shard_and_merge("directions", "ran", "merged")
    with pytest.raises(ExplorerError, match=r"Stage steering reads stage saes, which the store does not hold up to "
                                            r"date.*shard and merge saes first"):
        pipeline.run_shard(config, STAGES, ShardSpec(1, 2), stage_name="steering")
    shard_and_merge("saes", "ran", "merged")
    shard_and_merge("steering", "ran", "merged")
    shard_and_merge("circuits", "ran", "merged")
    assert pipeline.run_shard(config, STAGES, ShardSpec(1, 2)) == []  # every sharded stage is merged
    # the plain run after the last merge (precompute/cluster/finish.sh) runs only the unsharded stages
    reports = {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}
    assert reports.pop("tradeoff") == "ran" and reports.pop("backup") == "ran"
    assert set(reports.values()) == {"skipped", "not applicable"}
    for stage in ("generate", "directions", "saes", "steering", "circuits"):
        assert store.stage_hash(config.store, stage) == store.stage_hash(tiny_store, stage)
    for name in ("direction_candidates", "refusal_directions", "direction_generations", "direction_effects",
                 "direction_harmlessness", "cross_ablation", "layer_separation", "direction_projections",
                 "category_cosines", "hard_prompt_direction", "saes", "sae_corpus", "features", "feature_examples",
                 "feature_groups", "feature_direction_cosines", "steering_effects", "steering_harmlessness",
                 "steering_generations", "steering_rates", "circuits", "circuit_nodes", "circuit_edges",
                 "circuit_faithfulness", "circuit_similarity", "circuit_verdicts", "circuit_core",
                 "circuit_components"):
        # Shards add activations up in another order and batch prompts otherwise: equal up to float
        # rounding, which faithfulness (a ratio of two differences of metrics, over the 4 prompts a tiny
        # circuit is measured on, with the random model's differences near 0) magnifies ~100x.
        rtol, atol = (1e-3, 1e-3) if name in FAITHFULNESS_TABLES else (1e-4, 1e-5)
        pd.testing.assert_frame_equal(_sorted(config.store, name), _sorted(tiny_store, name), check_dtype=False,
                                      rtol=rtol, atol=atol, obj=name)


def test_a_stage_that_cannot_be_sharded_is_named(tmp_path, tiny_model_dir, prompt_file) -> None:
    config = parse_config(_raw(tmp_path, tiny_model_dir, prompt_file))
    with pytest.raises(ExplorerError, match=r"Stage prompts cannot be sharded with this config.*shard one of generate"):
        pipeline.run_shard(config, STAGES, ShardSpec(1, 2), stage_name="prompts")
    with pytest.raises(ExplorerError, match="Unknown stage 'generation'"):
        pipeline.merge_shards(config, STAGES, 2, rerun=RERUN, stage_name="generation")
    with pytest.raises(ExplorerError, match="reads stage generate, which the store does not hold up to date"):
        pipeline.run_shard(parse_config(_raw(tmp_path, tiny_model_dir, prompt_file) | {"directions": {"model": "base"}}), STAGES,
                           ShardSpec(1, 2), stage_name="directions")


def test_a_shard_without_rows_merges(tmp_path) -> None:
    """A shard can hold no rows of a table (e.g. no circuit group hashed to it), even without columns."""
    store_path = tmp_path / "s.duckdb"
    full = pd.DataFrame({"prompt_id": ["a", "b"], "score": [1.0, 2.0]})
    for k, frame in ((1, full), (2, pd.DataFrame()), (3, full.iloc[:0])):
        shards.write_partition(shards.partition_dir(store_path, "x", ShardSpec(k, 3)), stage="x", shard=ShardSpec(k, 3),
                               input_hash="h", tables={"scores": frame, "nothing": pd.DataFrame()})
    tables = shards.read_partitions(store_path, "x", 3, input_hash="h", keys={"scores": ("prompt_id",)}, rerun=RERUN)
    pd.testing.assert_frame_equal(tables["scores"], full)
    assert tables["nothing"].empty
