"""`tune-sweep`: a grid of fine-tune settings, each point its own study, model folder and store."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.findings import study_findings
from engine.errors import ExplorerError
from precompute.config import load_config, parse_config
from precompute.sweep import direction_scores, grid_points, parse_grid, point_config


def test_grid_parsing_and_points() -> None:
    grid = parse_grid(["learning_rate=1e-4,3e-4", "plain_per_toxic=1,2", "builtin=balanced"])
    assert grid == {"learning_rate": [1e-4, 3e-4], "plain_per_toxic": [1, 2], "builtin": ["balanced"]}
    assert len(grid_points(grid)) == 4
    for bad in ("learning_rate", "speed=1", "epochs="):
        with pytest.raises(ExplorerError, match="Bad sweep setting"):
            parse_grid([bad])


def test_each_point_has_its_own_model_folder_and_store() -> None:
    config = load_config("precompute/configs/demo.yaml")
    first = point_config(config, {"learning_rate": 1e-4, "builtin": "original"})
    second = point_config(config, {"learning_rate": 3e-4, "builtin": "original"})
    assert first.tune.learning_rate == 1e-4 and first.prompts.sources[0]["variant"] == "original"
    assert first.study != second.study and first.store != second.store
    assert list(first.models) == ["tuned"] and first.models["tuned"].startswith("smollm2-135m-refusal-sweep-")
    assert first.models["tuned"] != second.models["tuned"] != config.models["tuned"]
    assert first.directions is None and first.evaluation == config.evaluation
    assert point_config(config, {"learning_rate": 1e-4, "builtin": "original"}).study == first.study


def test_the_point_with_the_configs_own_settings_is_the_study_itself() -> None:
    config = load_config("precompute/configs/demo.yaml")
    own = {"plain_per_toxic": config.tune.plain_per_toxic, "builtin": config.prompts.sources[0]["variant"]}
    assert point_config(config, own) is config


def test_a_point_may_run_up_to_the_directions_stage() -> None:
    config = load_config("precompute/configs/demo.yaml")
    point = point_config(config, {"frozen_layers": 12}, until="directions")
    assert point.tune.frozen_layers == 12 and point.directions == config.directions
    assert point.saes is None and point.steering is None and point.circuits is None
    assert point.study == point_config(config, {"frozen_layers": 12}).study  # one model and store either way
    with pytest.raises(ExplorerError, match="cannot stop at 'saes'"):
        point_config(config, {"frozen_layers": 12}, until="saes")


def test_direction_scores_are_the_chosen_directions_own_figures(tiny_store: Path, tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    import shutil

    import duckdb

    from tests.conftest import tiny_study_settings

    direction = study_findings(tiny_store).direction
    assert direction is not None
    figures = {"toxic_ablated": direction.toxic_ablated.text(), "kl_ablated": round(direction.kl, 3)}
    site = f"layer {direction.layer} {direction.position_label!r}"
    for eligible, suffix in ((True, ""), (False, " (none passed the filters: lowest ablation score)")):
        copy = tmp_path / f"eligible-{eligible}.duckdb"
        shutil.copy(tiny_store, copy)
        with duckdb.connect(str(copy)) as con:
            con.execute("UPDATE direction_candidates SET eligible = ? WHERE chosen", [eligible])
        scores = direction_scores(parse_config(tiny_study_settings(copy, tiny_model_dir)))
        assert scores == {"chosen_site": site + suffix, **figures}
    assert "%" in figures["toxic_ablated"]
