"""Composable steering: feature clamping keeps the error term, hooks never leak between threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from engine.errors import ExplorerError
from engine.runtime.generation import generate
from engine.runtime.interventions import applied
from engine.runtime.scoring import next_token_logprobs
from engine.saes.training import SaeTraining, train_sae
from engine.steering.spec import Addition, FeatureClamp, Steering

PROMPTS = ["Explain why ice floats on water", "Name a fruit", "Write a short poem about the sea today"]
HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def tiny_sae():
    training = SaeTraining(expansion=2, k=8, steps=30, batch_size=64)
    return train_sae(training, torch.randn(512, 64), HOOK, "tiny")


def _logits(model, steering: Steering) -> np.ndarray:
    with applied(model, steering.hooks(model)):
        return next_token_logprobs(model, PROMPTS, batch_size=3)


def test_clamping_a_feature_to_itself_changes_nothing(tiny_model, tiny_sae) -> None:
    plain = _logits(tiny_model, Steering())
    same = _logits(tiny_model, Steering(clamp=(FeatureClamp(tiny_sae, (0, 3, 7), scale=1.0),)))
    assert np.allclose(plain, same, atol=1e-5)
    moved = _logits(tiny_model, Steering(clamp=(FeatureClamp(tiny_sae, (0, 3, 7), value=50.0),)))
    assert not np.allclose(plain, moved, atol=1e-3)


def test_clamp_sets_the_feature_and_keeps_the_rest(tiny_model, tiny_sae) -> None:
    seen: dict[str, torch.Tensor] = {}

    def keep(activation, hook):
        seen["x"] = activation.detach().clone()
        return activation

    steering = Steering(clamp=(FeatureClamp(tiny_sae, (5,), value=4.0),))
    with applied(tiny_model, [*steering.hooks(tiny_model), ("blocks.1.hook_resid_pre", keep)]):
        next_token_logprobs(tiny_model, PROMPTS[:1], batch_size=1)
    with applied(tiny_model, [("blocks.1.hook_resid_pre", keep)]):
        next_token_logprobs(tiny_model, PROMPTS[:1], batch_size=1)
    plain = seen["x"]
    codes = tiny_sae.encode(plain)
    expected = plain + (4.0 - codes[..., 5:6]) * tiny_sae.W_dec[5]
    with applied(tiny_model, [*steering.hooks(tiny_model), ("blocks.1.hook_resid_pre", keep)]):
        next_token_logprobs(tiny_model, PROMPTS[:1], batch_size=1)
    assert torch.allclose(seen["x"], expected.detach(), atol=1e-5)


def test_two_threads_steering_one_model_match_each_alone(tiny_model) -> None:
    generator = np.random.default_rng(0)
    a = Steering(add=(Addition(generator.normal(size=64).astype(np.float32), layer=1, alpha=20.0),))
    b = Steering(ablate=(generator.normal(size=64).astype(np.float32),))

    def run(steering: Steering) -> list[str]:
        with applied(tiny_model, steering.hooks(tiny_model)):
            return [g.text for g in generate(tiny_model, PROMPTS, max_new_tokens=6, batch_size=3)]

    alone = {"a": run(a), "b": run(b), "none": run(Steering())}
    together: dict[str, list[list[str]]] = {"a": [], "b": [], "none": []}

    def worker(name: str, steering: Steering) -> None:
        for _ in range(3):
            together[name].append(run(steering))

    threads = [threading.Thread(target=worker, args=item) for item in (("a", a), ("b", b), ("none", Steering()))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert alone["a"] != alone["none"]  # the steering does something
    for name, outputs in together.items():
        assert outputs == [alone[name]] * 3


def test_a_failed_generation_leaves_no_hook_behind(tiny_model) -> None:
    steering = Steering(add=(Addition(np.ones(64, np.float32), layer=0, alpha=5.0),))
    plain = _logits(tiny_model, Steering())
    with pytest.raises(RuntimeError, match="boom"), applied(tiny_model, steering.hooks(tiny_model)):
        raise RuntimeError("boom")
    assert np.allclose(_logits(tiny_model, Steering()), plain)
    assert not any(hook.fwd_hooks for hook in tiny_model.bridge.hook_dict.values())


def test_bad_steering_is_a_clear_error(tiny_model, tiny_sae) -> None:
    with pytest.raises(ExplorerError, match="Feature 128 does not exist"):
        FeatureClamp(tiny_sae, (128,), value=1.0)
    with pytest.raises(ExplorerError, match="exactly one of value and scale"):
        FeatureClamp(tiny_sae, (1,))
    with pytest.raises(ExplorerError, match="Layer 9 does not exist"):
        Steering(add=(Addition(np.ones(64, np.float32), layer=9),)).hooks(tiny_model)
    with pytest.raises(ExplorerError, match="does not fit this model"):
        Steering(ablate=(np.ones(10, np.float32),)).hooks(tiny_model)


def test_compared_answers_match_each_alone_and_stream(tiny_model) -> None:
    from engine.steering.spec import compare_answers

    steering = Steering(add=(Addition(np.ones(64, np.float32), layer=1, alpha=10.0),))
    streamed: dict[int, str] = {}
    baseline, steered = compare_answers(tiny_model, PROMPTS[0], steering, [5, 6], max_new_tokens=6,
                                        on_text=streamed.__setitem__)
    for answer, spec in ((baseline, Steering()), (steered, steering)):
        with applied(tiny_model, spec.hooks(tiny_model)):
            alone = generate(tiny_model, PROMPTS[:1], max_new_tokens=6, batch_size=1)[0]
            logprobs = next_token_logprobs(tiny_model, PROMPTS[:1], batch_size=1)[0]
        assert answer.text == alone.text  # only the steered row is steered
        assert answer.top_tokens[0][1] == pytest.approx(float(np.exp(logprobs.max())), rel=1e-4)
        expected = np.logaddexp(logprobs[5], logprobs[6])
        assert answer.refusal_score == pytest.approx(expected - np.log(-np.expm1(expected)), rel=1e-4)
    assert baseline.text != steered.text
    assert streamed[0].strip() == baseline.text and streamed[1].strip() == steered.text


@pytest.mark.parametrize(("prompt", "tokens", "alpha", "message"), [
    ("", 8, 1.0, "The prompt is empty"),
    ("x" * 1001, 8, 1.0, "1001 characters, over the limit of 1000"),
    ("hi", 0, 1.0, "0 new tokens is out of range"),
    ("hi", 129, 1.0, "129 new tokens is out of range"),
    ("hi", 8, 900.0, "alpha = 900.0 is out of range"),
])
def test_live_steering_limits_are_clear_errors(tiny_model, prompt, tokens, alpha, message) -> None:
    from engine.steering.spec import compare_answers

    steering = Steering(add=(Addition(np.ones(64, np.float32), layer=1, alpha=alpha),))
    with pytest.raises(ExplorerError, match=message):
        compare_answers(tiny_model, prompt, steering, [5], max_new_tokens=tokens)
