"""Interventions, activation capture and forward-pass scores on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.circuits.attribution import metric_gradients
from engine.circuits.refusal_metric import RefusalMetric
from engine.judging.judge import refusal_score
from engine.runtime.activations import capture, capture_tokens, post_instruction_tokens, prompt_end_positions
from engine.runtime.chat import chat_prompt
from engine.runtime.interventions import ablation_hooks, addition_hooks, applied
from engine.runtime.scoring import completion_cross_entropy, kl_divergence, next_token_logprobs

PROMPTS = ["Explain why ice floats on water", "Name a fruit", "Write a short poem about the sea today"]


def _resid(model, prompt: str, layers: range) -> dict[int, torch.Tensor]:
    ids = model.tokenizer(chat_prompt(model.tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    _, cache = model.bridge.run_with_cache(ids["input_ids"])
    return {layer: cache[f"blocks.{layer}.hook_resid_pre"][0] for layer in layers}


def test_prompt_end_positions_follow_the_template(tiny_model) -> None:
    assert post_instruction_tokens(tiny_model.tokenizer) == ["<|im_end|>", "<|im_start|>", "assistant"]
    positions = prompt_end_positions(tiny_model.tokenizer)
    assert positions.offsets == (-4, -3, -2, -1) and positions.labels[0] == "<instruction end>"


def test_capture_matches_run_with_cache_in_any_batch(tiny_model) -> None:
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    batched = capture(tiny_model, PROMPTS, hooks, [-3, -1], batch_size=3)
    assert batched.shape == (3, 2, 2, 64)
    for i, prompt in enumerate(PROMPTS):
        reference = _resid(tiny_model, prompt, range(2))
        for h in range(2):
            assert np.allclose(batched[i, h], reference[h][[-3, -1]].numpy(), atol=1e-4)


def test_capture_streams_into_a_disk_array(tiny_model, tmp_path) -> None:
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    in_memory = capture(tiny_model, PROMPTS, hooks, [-2, -1], batch_size=2)
    on_disk = np.lib.format.open_memmap(tmp_path / "acts.npy", mode="w+", dtype=np.float32, shape=in_memory.shape)
    assert capture(tiny_model, PROMPTS, hooks, [-2, -1], batch_size=2, out=on_disk) is on_disk
    on_disk.flush()
    assert np.allclose(np.load(tmp_path / "acts.npy"), in_memory, atol=1e-6)


def test_capture_rejects_positions_out_of_range(tiny_model) -> None:
    from engine.errors import ExplorerError

    with pytest.raises(ExplorerError, match="must be negative offsets"):
        capture(tiny_model, PROMPTS, ["blocks.0.hook_resid_pre"], [0], batch_size=2)
    with pytest.raises(ExplorerError, match="Position -500 lies before the start"):
        capture(tiny_model, PROMPTS, ["blocks.0.hook_resid_pre"], [-500], batch_size=2)


def test_ablation_removes_the_direction_at_every_layer(tiny_model) -> None:
    direction = torch.randn(64)
    seen: list[float] = []

    def record(activation, hook):
        seen.append(float((activation.detach() @ (direction / direction.norm())).abs().max()))
        return activation

    taps = [(f"blocks.{layer}.hook_resid_post", record) for layer in range(2)]
    ids = tiny_model.tokenizer(chat_prompt(tiny_model.tokenizer, PROMPTS[0]), return_tensors="pt",
                               add_special_tokens=False)["input_ids"]
    with applied(tiny_model, ablation_hooks(tiny_model, direction) + taps):
        tiny_model.hf_model(ids)
    assert max(seen) < 1e-4
    seen.clear()
    with applied(tiny_model, taps):
        tiny_model.hf_model(ids)
    assert max(seen) > 1e-2  # without ablation the component is there


def test_addition_shifts_one_layer_and_hooks_never_leak(tiny_model) -> None:
    direction = torch.randn(64)
    before = _resid(tiny_model, PROMPTS[1], range(2))
    with applied(tiny_model, addition_hooks(tiny_model, direction, layer=1, alpha=2.0)):
        during = _resid(tiny_model, PROMPTS[1], range(2))
    assert torch.allclose(during[0], before[0], atol=1e-5)
    assert torch.allclose(during[1], before[1] + 2.0 * direction / direction.norm(), atol=1e-4)
    with applied(tiny_model, addition_hooks(tiny_model, direction, layer=1)):  # alpha=None: its own norm
        raw = _resid(tiny_model, PROMPTS[1], range(2))
    assert torch.allclose(raw[1], before[1] + direction, atol=1e-4)
    with pytest.raises(RuntimeError, match="boom"), applied(
            tiny_model, addition_hooks(tiny_model, direction, layer=1, alpha=2.0)):
        raise RuntimeError("boom")
    after = _resid(tiny_model, PROMPTS[1], range(2))
    assert torch.allclose(after[1], before[1], atol=1e-6)


def test_bad_layer_is_one_clear_error(tiny_model) -> None:
    from engine.errors import ExplorerError

    with pytest.raises(ExplorerError, match="Layer 5 does not exist.*0..1"):
        addition_hooks(tiny_model, torch.zeros(64), layer=5, alpha=1.0)
    with pytest.raises(ExplorerError, match="zero or non-finite norm"):
        ablation_hooks(tiny_model, torch.zeros(64))
    with pytest.raises(ExplorerError, match=r"shape \(576,\) does not fit.*d_model = 64"):
        ablation_hooks(tiny_model, torch.ones(576))
    with pytest.raises(ExplorerError, match="does not fit"):
        addition_hooks(tiny_model, torch.ones(32), layer=0, alpha=1.0)


def test_kl_and_cross_entropy(tiny_model) -> None:
    logprobs = next_token_logprobs(tiny_model, PROMPTS, batch_size=2)
    assert np.allclose(kl_divergence(logprobs, logprobs), 0, atol=1e-6)
    with applied(tiny_model, addition_hooks(tiny_model, torch.randn(64) * 5, layer=0, alpha=1.0)):
        shifted = next_token_logprobs(tiny_model, PROMPTS, batch_size=2)
    assert (kl_divergence(logprobs, shifted) > 1e-4).all()
    completions = ["Sure , here", "I can help you with that", ""]  # lengths differ within a batch
    ce = completion_cross_entropy(tiny_model, PROMPTS[:3], completions, batch_size=3)
    assert np.isnan(ce[2])  # an empty completion has no cross-entropy
    for i in range(2):  # against a direct, unbatched computation
        prompt_ids = tiny_model.tokenizer(chat_prompt(tiny_model.tokenizer, PROMPTS[i]), add_special_tokens=False)["input_ids"]
        answer_ids = tiny_model.tokenizer(completions[i], add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = tiny_model.hf_model(torch.tensor([prompt_ids + answer_ids])).logits[0].float()
        predicted = torch.log_softmax(logits, -1)[len(prompt_ids) - 1:-1]
        expected = -predicted.gather(-1, torch.tensor(answer_ids)[:, None]).mean()
        assert ce[i] == pytest.approx(float(expected), abs=1e-4)


def test_capture_tokens_keeps_real_tokens_and_matches_the_cache(tiny_model) -> None:
    texts = [chat_prompt(tiny_model.tokenizer, p) for p in PROMPTS]
    special = tiny_model.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    sequences = [tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    result = capture_tokens(tiny_model, sequences, ["blocks.1.hook_resid_pre"], batch_size=2, skip_token_ids=special)
    for i, ids in enumerate(sequences):
        expected_positions = [p for p, t in enumerate(ids) if p > 0 and t not in special]
        mine = result.position[result.text_index == i]
        assert sorted(mine.tolist()) == expected_positions
        _, cache = tiny_model.bridge.run_with_cache(torch.tensor([ids]))
        reference = cache["blocks.1.hook_resid_pre"][0].numpy()
        rows = np.flatnonzero(result.text_index == i)
        assert np.allclose(result.values[rows, 0], reference[result.position[rows]], atol=1e-4)
        assert (result.token_id[rows] == np.array(ids)[result.position[rows]]).all()


def test_refusal_score_gradients_match_a_finite_difference(tiny_model) -> None:
    token_ids = tiny_model.tokenizer.convert_tokens_to_ids(["I", "cannot"])
    hook = "blocks.1.hook_resid_pre"
    result = metric_gradients(tiny_model, PROMPTS, [hook], [-2, -1], RefusalMetric("refusal_score", tuple(token_ids)),
                              batch_size=2)
    assert result.gradients.shape == (3, 1, 2, 64)
    direction = torch.from_numpy(result.gradients[0, 0, 1]).float()
    step = 1e-2 / float(direction.norm())

    def nudge(activation, hook):
        activation = activation.clone()
        activation[:, -1] += step * direction
        return activation

    plain = refusal_score(next_token_logprobs(tiny_model, PROMPTS[:1], batch_size=1, token_ids=token_ids))
    with applied(tiny_model, [(hook, nudge)]):
        nudged = refusal_score(next_token_logprobs(tiny_model, PROMPTS[:1], batch_size=1, token_ids=token_ids))
    assert result.metric[0] == pytest.approx(plain[0], abs=1e-4)
    assert (nudged - plain)[0] == pytest.approx(step * float(direction @ direction), rel=0.05)
    captured = capture(tiny_model, PROMPTS, [hook], [-2, -1], batch_size=3)
    assert np.allclose(result.activations, captured, atol=1e-4)


def test_capture_stops_once_its_hooks_have_fired(tiny_model) -> None:
    later: list[int] = []

    def count(activation, hook):
        later.append(1)
        return activation

    with applied(tiny_model, [("blocks.1.hook_resid_pre", count)]):
        captured = capture(tiny_model, PROMPTS, ["blocks.0.hook_resid_pre"], [-1], batch_size=3)
    assert later == [] and np.abs(captured).sum() > 0  # block 1 never ran
    with applied(tiny_model, [("blocks.1.hook_resid_pre", count)]):
        capture(tiny_model, PROMPTS, ["blocks.0.hook_resid_pre"] * 2, [-1], batch_size=3)
    assert later == []
    # the model still runs whole afterwards
    assert np.isfinite(next_token_logprobs(tiny_model, PROMPTS, batch_size=3)).all()
