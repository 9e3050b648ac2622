"""Any taxonomy: a study's categories come from its data, and no loaded prompt vanishes unannounced."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from engine.data import store
from engine.data.prompt_sources import load_builtin
from precompute import pipeline
from precompute.config import parse_config
from precompute.stages import STAGES
from precompute.stages.prompts import NOT_CHOSEN, REPEATED
from tests.conftest import tiny_study_settings

APP = Path(__file__).resolve().parents[1] / "app"
# Three of the built-in set's categories under JailbreakBench- and HarmBench-style names.
RENAMED = {"deception": "Fraud/Deception", "hate": "Harassment/Discrimination", "violence": "chemical_biological"}


def _renamed_builtin(path: Path) -> Path:
    builtin = load_builtin()
    kept = builtin[builtin["category"].isin([*RENAMED, "none"])]
    kept.assign(category=kept["category"].replace(RENAMED))[["text", "category", "kind"]].to_csv(path, index=False)
    return path


def _table_source(path: Path) -> dict:
    return {"type": "table", "path": str(path), "mapping": {"category": "category", "kind": "kind"}}


def test_prompts_stage_counts_every_prompt_it_leaves_out(tmp_path: Path, tiny_model_dir: Path, caplog) -> None:
    first = _renamed_builtin(tmp_path / "first.csv")
    second = tmp_path / "second.csv"
    again = pd.read_csv(first).head(7)  # seven prompts repeated from the first source
    new = pd.DataFrame({"text": [f"Tell me how to do thing {i}" for i in range(5)], "category": "Malware/Hacking",
                        "kind": "toxic"})
    pd.concat([again, new]).to_csv(second, index=False)
    kept_categories = ["Fraud/Deception", "chemical_biological"]
    config = parse_config({"study": "counted", "store": str(tmp_path / "s.duckdb"),
                           "models": {"base": str(tiny_model_dir)},
                           "prompts": {"sources": [_table_source(first), _table_source(second)],
                                       "categories": kept_categories}})
    with caplog.at_level(logging.WARNING, logger="precompute.stages.prompts"):
        pipeline.run_pipeline(config, STAGES, until="prompts")
    prompts = store.read_table(config.store, "prompts")
    loaded = len(pd.read_csv(first)) + len(pd.read_csv(second))
    named = pd.concat([pd.read_csv(first), new])
    not_chosen = int((~named["category"].isin([*kept_categories, "none"])).sum())
    runs = store.read_table(config.store, "runs").query("stage == 'prompts'")
    left_out = json.loads(runs["config"].iloc[-1])["left_out"]
    assert left_out == {REPEATED: 7, NOT_CHOSEN: not_chosen}
    assert len(prompts) + sum(left_out.values()) == loaded  # every loaded prompt is kept or counted
    assert set(prompts["category"]) == {*kept_categories, "none"}
    lines = [r.getMessage() for r in caplog.records]
    assert sum(REPEATED in line for line in lines) == 1 and sum(NOT_CHOSEN in line for line in lines) == 1


def test_without_a_category_list_every_category_in_the_data_is_kept(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = _renamed_builtin(tmp_path / "set.csv")
    config = parse_config({"study": "all", "store": str(tmp_path / "s.duckdb"), "models": {"base": str(tiny_model_dir)},
                           "prompts": {"sources": [_table_source(source)]}})
    pipeline.run_pipeline(config, STAGES, until="prompts")
    assert set(store.read_table(config.store, "prompts")["category"]) == {*RENAMED.values(), "none"}
    runs = store.read_table(config.store, "runs").query("stage == 'prompts'")
    assert "left_out" not in json.loads(runs["config"].iloc[-1])


@pytest.mark.parametrize("categories", [[], ["hate", " "], ["hate", "hate"]])
def test_a_bad_category_list_is_one_clear_error(categories: list[str]) -> None:
    from engine.errors import ExplorerError

    with pytest.raises(ExplorerError, match="prompts.categories"):
        parse_config({"study": "x", "models": {"base": "smollm2-135m-instruct"},
                      "prompts": {"categories": categories}})


def test_a_taxonomy_outside_orbench_flows_through_every_stage_to_the_store_and_the_app(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    settings = tiny_study_settings(tmp_path / "taxonomy.duckdb", tiny_model_dir)
    settings["prompts"] = {"sources": [_table_source(_renamed_builtin(tmp_path / "set.csv"))], "test_fraction": 0.3}
    settings["circuits"] |= {"min_prompts": 4}
    config = parse_config(settings)
    reports = {r.stage: r.status for r in pipeline.run_pipeline(config, STAGES)}
    assert {reports[name] for name in ("directions", "saes", "steering", "circuits", "tradeoff")} == {"ran"}
    names = set(RENAMED.values())
    read = lambda name: store.read_table(config.store, name)
    cosines = read("category_cosines")
    assert names <= set(cosines.filter(like="category").stack())
    toxic_circuits = read("circuits").query("kind == 'toxic' and status == 'ok'")
    assert set(toxic_circuits["category"]) == names
    assert read("circuit_verdicts").set_index("kind").loc["toxic", "n_categories"] == 3
    charts = {}
    for page in ("overview", "directions", "circuits", "compare", "prompts"):  # findings: tests/test_findings.py
        app = AppTest.from_file(str(APP / "views" / f"{page}.py"), default_timeout=90)
        app.session_state["store_path"] = str(config.store)
        app.run()
        assert not app.exception and not app.error, page
        charts[page] = b" ".join(chart.proto.SerializeToString() for chart in app.get("vega_lite_chart"))
    for page in ("overview", "directions", "circuits"):  # in the charts' data (inline or Arrow)
        assert b"Harassment/Discrimination" in charts[page], page
