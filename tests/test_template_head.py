"""The chat template's head runs once per call and is reused by every batch: results must equal
running each prompt on its own (no shared head, no padding), under interventions too."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from engine.circuits.attribution import metric_gradients
from engine.runtime.activations import capture, capture_tokens, prompt_end_positions
from engine.runtime.chat import chat_prompt
from engine.runtime.generation import generate, map_encoded, template_head
from engine.runtime.interventions import ablation_hooks, addition_hooks, applied
from engine.runtime.scoring import next_token_logprobs

SYSTEM_TURN = "{{ '<|im_start|>system\nYou are a helpful assistant and you help<|im_end|>\n' }}"
PROMPTS = ["How do I bake bread", "Write a poem about the sea and the sky at night", "Explain taxes",
           "Tell me how to steal a car", "Give me a list of words"]


@pytest.fixture(scope="module")
def model(tiny_model):
    """The tiny model with a system prompt in its template, as real chat models have."""
    tokenizer = copy.deepcopy(tiny_model.tokenizer)
    tokenizer.chat_template = SYSTEM_TURN + tiny_model.tokenizer.chat_template
    return dataclasses.replace(tiny_model, tokenizer=tokenizer)


def one_by_one(function, prompts):
    """`function` over single-prompt calls: no head is cached for a single prompt, no padding."""
    return np.concatenate([function([prompt]) for prompt in prompts])


def test_template_head_is_what_precedes_every_instruction(model):
    head = template_head(model.tokenizer)
    decoded = model.tokenizer.decode(head)
    assert decoded.startswith("<|im_start|> system") and decoded.endswith("user")
    for prompt in PROMPTS:
        ids = model.tokenizer(chat_prompt(model.tokenizer, prompt), add_special_tokens=False)["input_ids"]
        assert ids[: len(head)] == head and len(ids) > len(head)


def test_batches_hold_only_the_tokens_after_the_head(model):
    head = template_head(model.tokenizer)
    widths = [encoded.input_ids.shape[1] for _, encoded in
              map_encoded(model, PROMPTS, 2, lambda _, encoded: encoded, desc="t")]
    full = [len(model.tokenizer(chat_prompt(model.tokenizer, p), add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert max(widths) == max(full) - len(head)
    without = [encoded.input_ids.shape[1] for _, encoded in
               map_encoded(model, PROMPTS, 2, lambda _, encoded: encoded, desc="t", reuse_head=False)]
    assert max(without) == max(full)


@pytest.mark.parametrize("intervention", ["none", "ablation", "addition"])
def test_next_token_logprobs_equal_each_prompt_alone(model, intervention):
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    hooks = {"none": [], "ablation": ablation_hooks(model, direction),
             "addition": addition_hooks(model, direction * 3, 1)}[intervention]
    with applied(model, hooks):
        batched = next_token_logprobs(model, PROMPTS, batch_size=2)
        alone = one_by_one(lambda p: next_token_logprobs(model, p, batch_size=1), PROMPTS)
    np.testing.assert_allclose(batched, alone, atol=1e-4)
    if intervention != "none":  # the head itself was run under the intervention
        with applied(model, []):
            plain = next_token_logprobs(model, PROMPTS, batch_size=2)
        assert np.abs(plain - batched).max() > 1e-3


def test_capture_equals_each_prompt_alone_and_skips_the_head(model):
    offsets = prompt_end_positions(model.tokenizer).offsets
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.n_layers)]
    batched = capture(model, PROMPTS, hooks, offsets, batch_size=3)
    alone = one_by_one(lambda p: capture(model, p, hooks, offsets, batch_size=1), PROMPTS)
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_generation_equals_each_prompt_alone_under_ablation(model):
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    with applied(model, ablation_hooks(model, direction)):
        batched = [g.text for g in generate(model, PROMPTS, max_new_tokens=6, batch_size=5)]
        alone = [generate(model, [p], max_new_tokens=6, batch_size=1)[0].text for p in PROMPTS]
    assert batched == alone


def test_gradients_at_the_prompt_end_equal_each_prompt_alone(model):
    offsets = prompt_end_positions(model.tokenizer).offsets[-3:]
    hook = ["blocks.1.hook_resid_pre"]

    def metric(logits):
        return logits[:, 5] - logits[:, 7]

    batched = metric_gradients(model, PROMPTS, hook, offsets, metric, batch_size=5)
    alone = [metric_gradients(model, [p], hook, offsets, metric, batch_size=1) for p in PROMPTS]
    np.testing.assert_allclose(batched.gradients, np.concatenate([a.gradients for a in alone]), atol=1e-5)
    np.testing.assert_allclose(batched.metric, np.concatenate([a.metric for a in alone]), atol=1e-5)


def test_sae_corpus_leaves_out_the_template_head(model):
    """The head's activations are the same in every transcript: an SAE corpus keeps none of them."""
    head = template_head(model.tokenizer)
    sequences = [model.tokenizer(chat_prompt(model.tokenizer, p), add_special_tokens=False)["input_ids"]
                 for p in PROMPTS]
    hook = ["blocks.1.hook_resid_pre"]
    kept = capture_tokens(model, sequences, hook, batch_size=2, skip_first=len(head))
    everything = capture_tokens(model, sequences, hook, batch_size=2)
    assert kept.position.min() == len(head)
    assert (everything.position < len(head)).sum() == len(PROMPTS) * (len(head) - 1)
    assert len(everything.position) - len(kept.position) == len(PROMPTS) * (len(head) - 1)


def test_sae_token_rule_is_one_for_training_and_live_encoding(model, monkeypatch):
    """The saes stage and the Features page's live encoding read the same tokens of a chat prompt."""
    from engine.runtime.activations import sae_tokens
    from engine.saes import features

    read = sae_tokens(model.tokenizer)
    assert read.skip_first == len(template_head(model.tokenizer)) and sae_tokens(model.tokenizer, chat=False).skip_first == 1
    assert set(read.skip_token_ids) == set(model.tokenizer.all_special_ids)
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("seen")

    monkeypatch.setattr(features, "capture_tokens", spy)
    monkeypatch.setattr(features, "check_sae_fits", lambda sae, model: "blocks.1.hook_resid_pre")
    monkeypatch.setattr(features, "check_feature", lambda sae, feature: None)
    with pytest.raises(RuntimeError, match="seen"):
        features.feature_on_text(model, None, 0, PROMPTS[0], as_chat_prompt=True)
    assert (tuple(seen["skip_token_ids"]), seen["skip_first"]) == (read.skip_token_ids, read.skip_first)
