"""`tune-sweep`: a grid of fine-tune settings, each point its own study, model folder and store."""

from __future__ import annotations

import pytest

from engine.errors import ExplorerError
from precompute.config import load_config
from precompute.sweep import grid_points, parse_grid, point_config


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
