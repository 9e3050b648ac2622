"""`python -m precompute replicate`: sibling studies per seed, and the verdict table they make."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from engine.data import store
from engine.errors import ExplorerError
from precompute.config import load_config, parse_config
from precompute.replicate import REPLICATION_TABLE, replicated, run_replicate, seed_config
from tests.conftest import tiny_study_settings

DEMO = Path(__file__).resolve().parents[1] / "precompute" / "configs" / "demo.yaml"


def test_seed_config_reseeds_every_stage_the_verdict_depends_on() -> None:
    demo = load_config(DEMO)
    assert seed_config(demo, 0) is demo
    sibling = seed_config(demo, 2)
    assert (sibling.tune.seed, sibling.directions.seed, sibling.saes.seed, sibling.circuits.seed) == (2, 2, 2, 2)
    # The fine-tuned model gets a folder of its own; the base model is the same one.
    assert sibling.models == {"base": demo.models["base"], "tuned": demo.models["tuned"] + "-seed2"}
    assert sibling.store != demo.store and sibling.study == "demo-seed2"
    assert sibling.steering is None and sibling.evaluation is None  # not needed for the verdict
    assert sibling.tune.learning_rate == demo.tune.learning_rate and sibling.circuits.max_prompts == 24


def test_replicated_says_whether_every_seed_agrees() -> None:
    table = pd.DataFrame({"kind": ["toxic"] * 3 + ["hard"] * 3, "seed": [0, 1, 2] * 2,
                          "label": ["inconclusive"] * 3 + ["modular", "inconclusive", "modular"]})
    summary = replicated(table).set_index("kind")
    assert summary.loc["toxic", "replicated"] and not summary.loc["hard", "replicated"]
    assert summary.loc["hard", "verdicts"] == "modular, inconclusive, modular"


def test_replicate_builds_a_sibling_per_seed_and_stores_the_table(tiny_store: Path, tiny_model_dir: Path,
                                                                  tmp_path: Path) -> None:
    own = tmp_path / "tiny.duckdb"
    shutil.copy(tiny_store, own)
    config = parse_config(tiny_study_settings(own, tiny_model_dir))
    table = run_replicate(config, 2)
    assert sorted(set(table["seed"])) == [0, 1]
    sibling = seed_config(config, 1)
    assert sibling.store.exists() and sibling.store != own
    for seed, study in ((0, own), (1, sibling.store)):
        verdicts = store.read_table(study, "circuit_verdicts")
        mine = table[table["seed"] == seed].set_index("kind")
        assert mine.loc[verdicts["kind"], "label"].tolist() == verdicts["label"].tolist()
    assert store.read_table(own, REPLICATION_TABLE)[["seed", "kind", "label"]].equals(table[["seed", "kind", "label"]])
    with pytest.raises(ExplorerError, match="out of range"):
        run_replicate(config, 1)
