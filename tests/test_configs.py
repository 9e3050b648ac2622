"""Every study config in precompute/configs/ parses with the project's parser (no model download)
and keeps the invariants a real-model GPU study needs."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import get_args

import pytest

from engine.circuits.refusal_metric import METRICS, Metric
from engine.config_checks import Range
from engine.data.prompt_sources import BUILTIN_VARIANTS, BuiltinVariant
from engine.errors import ExplorerError
from engine.runtime.models import DTYPES, Dtype
from engine.saes.training import ARCHITECTURES, Architecture, SaeTraining
from precompute.config import SECTIONS, CircuitsConfig, GenerationConfig, Method, SaesConfig, load_config

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


# Every section's dataclass, with the settings it needs to be valid otherwise; SaeTraining is the
# engine's part of the saes section (its errors name saes.<setting> too).
SECTION_CLASSES = [*SECTIONS.items(), ("saes", SaeTraining)]
VALID = {"evaluation": {"sets": ({"name": "plain", "source": {"type": "builtin"}},)}}


def _bound_cases(outside: bool) -> list:
    """(section, class, setting, value): a value just outside (or at / just inside) each finite bound."""
    cases = []
    for section, cls in SECTION_CLASSES:
        types = {item.name: str(item.type) for item in dataclasses.fields(cls)}
        for name, allowed in cls.RANGES.items():
            whole = "int" in types[name].split(" | ")  # whole-number settings step by 1
            for bound, is_open, away in ((allowed.low, allowed.low_open, -math.inf),
                                         (allowed.high, allowed.high_open, math.inf)):
                if not math.isfinite(bound):
                    continue
                toward = -away  # into the range
                if outside:
                    value = bound if is_open else (bound + (1 if away > 0 else -1) if whole
                                                   else math.nextafter(bound, away))
                else:
                    value = bound if not is_open else (bound + (1 if toward > 0 else -1) if whole
                                                       else math.nextafter(bound, toward))
                value = int(value) if whole else float(value)
                side = "low" if away < 0 else "high"
                cases.append(pytest.param(section, cls, name, value, id=f"{cls.__name__}.{name}-{side}"))
    return cases


def test_every_section_declares_its_ranges() -> None:
    for section, cls in SECTION_CLASSES:
        names = {item.name for item in dataclasses.fields(cls)}
        assert cls.RANGES and set(cls.RANGES) <= names, section
        assert all(isinstance(allowed, Range) for allowed in cls.RANGES.values())
        cls(**VALID.get(section, {}))  # the defaults are in range
    assert set(SaeTraining.RANGES.items()) <= set(SaesConfig.RANGES.items())


@pytest.mark.parametrize(("section", "cls", "name", "value"), _bound_cases(outside=True))
def test_a_value_just_outside_a_range_names_the_setting(section: str, cls: type, name: str, value: float) -> None:
    with pytest.raises(ExplorerError, match=re.escape(f"{section}.{name} = {value!r} is out of range. Fix: use "
                                                      f"{cls.RANGES[name].text}.")):
        cls(**VALID.get(section, {}), **{name: value})


@pytest.mark.parametrize(("section", "cls", "name", "value"), _bound_cases(outside=False))
def test_a_value_on_the_edge_of_a_range_is_not_out_of_it(section: str, cls: type, name: str, value: float) -> None:
    try:
        cls(**VALID.get(section, {}), **{name: value})
    except ExplorerError as error:  # only a check relating it to another setting may refuse it (min_prompts 100000)
        assert "is out of range" not in error.problem and f"{section}.{name}" in error.problem


@pytest.mark.parametrize(("allowed", "text"), [
    (Range(1, 2048), "1-2048"),
    (Range(0.05, 0.95), "0.05-0.95"),
    (Range(0, 1e-2, low_open=True), "a value in (0, 0.01]"),
    (Range(0, 1, high_open=True), "a value in [0, 1)"),
    (Range(0, 1, low_open=True, high_open=True), "a value in (0, 1)"),
    (Range(1), "a value >= 1"),
    (Range(0, low_open=True), "a value > 0"),
    (Range(1, 1000, optional=True), "1-1000 or null"),
    (Range(0, 1000, low_open=True, optional=True), "a value in (0, 1000] or null"),
])
def test_range_text(allowed: Range, text: str) -> None:
    assert allowed.text == text


def test_optional_ranges_allow_null_and_others_do_not() -> None:
    assert Range(1, 2, optional=True).contains(None) and not Range(1, 2).contains(None)
    assert not Range(0, 2).contains(True) and not Range(0, 2).contains("1")


def test_enum_settings_are_literals_matching_the_runtime_choices() -> None:
    assert get_args(Dtype) == ("auto", *DTYPES)
    assert get_args(Architecture) == tuple(ARCHITECTURES)
    assert get_args(Metric) == METRICS
    assert get_args(BuiltinVariant) == tuple(BUILTIN_VARIANTS)
    assert get_args(Method) == ("attribution", "integrated_gradients")
    hints = {cls: {item.name: str(item.type) for item in dataclasses.fields(cls)}
             for cls in (GenerationConfig, SaeTraining, SaesConfig, CircuitsConfig)}
    assert hints[GenerationConfig]["dtype"] == "Dtype"
    assert hints[SaeTraining]["architecture"] == hints[SaesConfig]["architecture"] == "Architecture"
    assert hints[CircuitsConfig]["metric"] == "Metric" and hints[CircuitsConfig]["method"] == "Method"
    assert hints[SaesConfig]["autocast"] == "bool | Auto"
    for value in get_args(Dtype):
        GenerationConfig(dtype=value)
    for value in get_args(Architecture):
        SaeTraining(architecture=value)
    for metric in get_args(Metric):
        for method in get_args(Method):
            CircuitsConfig(metric=metric, method=method)
    for autocast in (True, False, "auto"):
        SaesConfig(autocast=autocast)
    with pytest.raises(ExplorerError, match="circuits.method = 'exact' is not one of the choices.*attribution or "
                                            "integrated_gradients"):
        CircuitsConfig(method="exact")


def test_saes_config_is_sae_training_plus_its_own_settings() -> None:
    config = SaesConfig(architecture="jumprelu", expansion=8, k=16, sparsity_coefficient=2.0, steps=50,
                        batch_size=64, lr=1e-3, seed=3, autocast=True, held_out_fraction=0.2)
    assert isinstance(config, SaeTraining)
    training = config.training()
    assert type(training) is SaeTraining
    assert training == SaeTraining(architecture="jumprelu", expansion=8, k=16, sparsity_coefficient=2.0, steps=50,
                                   batch_size=64, lr=1e-3, seed=3, autocast=True)
    assert SaesConfig().training() == SaeTraining()  # the same defaults
    shared = {item.name for item in dataclasses.fields(SaeTraining)}
    assert shared < {item.name for item in dataclasses.fields(SaesConfig)}
    assert SaesConfig(autocast="auto").training().autocast in (True, False)
    with pytest.raises(ExplorerError, match="saes.k = 0 is out of range"):  # the parent's checks run
        SaesConfig(k=0)


def test_relations_between_settings_name_both() -> None:
    for settings, message in [
        ({"min_prompts": 60}, "circuits.min_prompts = 60 is above circuits.max_prompts = 48"),
        ({"max_nodes": 200}, "circuits.max_nodes = 200 is above circuits.stored_nodes = 150"),
        ({"modular_ratio": 0.9}, "circuits.modular_ratio = 0.9 is not below circuits.monolithic_ratio = 0.8"),
        ({"faithfulness_sizes": (0, 5)}, r"circuits.faithfulness_sizes = \[0, 5\] is out of range"),
        ({"calibration_shares": (0.2, 0.1)}, r"circuits.calibration_shares = \[0.2, 0.1\] is out of range"),
        ({"calibration_scales": (1,)}, r"circuits.calibration_scales = \[1\] is out of range"),
        ({"kinds": ("benign",)}, r"circuits.kinds = \['benign'\] is out of range"),
    ]:
        with pytest.raises(ExplorerError, match=message):
            CircuitsConfig(**settings)
    with pytest.raises(ExplorerError, match=r"generation.splits = \['dev'\] is out of range"):
        GenerationConfig(splits=("dev",))
