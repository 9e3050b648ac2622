"""Every study config in precompute/configs/ parses with the project's parser (no model download)
and keeps the invariants a real-model GPU study needs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from precompute.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "precompute" / "configs").glob("*.yaml"))
# From each model's config.json (num_hidden_layers): the configs' SAE hooks must lie inside.
LAYERS = {
    "google/gemma-2-2b-it": 26,
    "meta-llama/Llama-3.2-1B-Instruct": 16,
    "Qwen/Qwen2.5-1.5B-Instruct": 28,
    "meta-llama/Llama-2-7b-chat-hf": 32,
    "mistralai/Mistral-7B-Instruct-v0.2": 32,
}
GPU_CONFIGS = [path for path in CONFIGS if not path.stem.startswith("demo")]  # demo*: the embedded model


def test_every_seed_model_has_a_config() -> None:
    models = {load_config(path).models["base"] for path in GPU_CONFIGS}
    assert models == set(LAYERS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_names_its_own_store(path: Path) -> None:
    config = load_config(path)
    assert config.study == path.stem  # the store is data/stores/<config name>.duckdb
    assert config.store.name == f"{path.stem}.duckdb"


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.stem)
def test_gpu_config_invariants(path: Path) -> None:
    config = load_config(path)
    assert list(config.models) == ["base"] and config.tune is None  # the fine-tune is demo-only
    n_layers = LAYERS[config.models["base"]]
    assert config.generation.dtype == "bfloat16" and set(config.generation.splits) == {"train", "test"}
    assert 8 <= config.generation.batch_size <= 128
    orbench = [s for s in config.prompts.sources if s["type"] == "orbench"]
    assert len(orbench) == 1 and set(orbench[0]["files"]) == {
        "or-bench-80k.csv", "or-bench-hard-1k.csv", "or-bench-toxic.csv"}
    assert any(s["type"] == "builtin" for s in config.prompts.sources)  # the safe prompts directions need
    assert config.directions is not None and config.directions.layer_stride == 1
    assert config.saes is not None and config.steering is not None and config.circuits is not None
    assert config.directions.model == config.saes.model == config.steering.model == config.circuits.model == "base"
    layers = [int(re.search(r"(?:layer_|blocks\.)(\d+)", entry["sae_id"]).group(1))
              for entry in config.saes.pretrained]
    layers += [int(re.search(r"blocks\.(\d+)\.", hook).group(1)) for hook in config.saes.hooks]
    assert all(0 <= layer < n_layers for layer in layers)
    if not config.saes.pretrained and not config.saes.hooks:
        assert all(abs(offset) < n_layers * (1 - config.directions.prune_last_fraction)
                   for offset in config.saes.layer_offsets)
