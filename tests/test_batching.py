"""Batch back-off on out-of-memory: the helper, and every batched loop of the engine through it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from engine.circuits.attribution import metric_gradients
from engine.circuits.refusal_metric import RefusalMetric
from engine.errors import ExplorerError
from engine.runtime import batching
from engine.runtime.activations import capture, capture_tokens, prompt_end_positions
from engine.runtime.batching import backed_off, is_out_of_memory
from engine.runtime.generation import generate
from engine.runtime.interventions import applied
from engine.runtime.scoring import completion_cross_entropy, next_token_logprobs
from engine.saes.training import SaeTraining, ce_loss_recovered, train_sae

PROMPTS = ["Explain why ice floats on water", "Name a fruit", "Write a short poem about the sea today",
           "How do I pick a lock", "Describe a cat", "Tell me about rivers in Europe", "Say hi"]


@pytest.fixture(autouse=True)
def no_remembered_sizes():
    """Each test starts without the batch sizes earlier loops fell back to."""
    batching._fitted_sizes.clear()
    yield
    batching._fitted_sizes.clear()


def failing_above(limit: int, attempts: list[int], error: type[Exception] = torch.OutOfMemoryError):
    def work(batch: list[int]) -> list[int]:
        attempts.append(len(batch))
        if len(batch) > limit:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [i * 10 for i in batch]
    return work


def test_backed_off_halves_on_oom_keeps_the_smaller_size_and_matches_no_oom(caplog) -> None:
    order = [4, 2, 9, 0, 7, 1, 3, 8, 6, 5]
    attempts: list[int] = []
    with caplog.at_level(logging.WARNING, logger="engine.runtime.batching"):
        results = list(backed_off(order, failing_above(2, attempts), batch_size=8, desc="test"))
    plain = list(backed_off(order, failing_above(100, []), batch_size=8))
    assert [i for batch, _ in results for i in batch] == order  # every item once, in order
    assert [r for _, rs in results for r in rs] == [r for _, rs in plain for r in rs]
    assert attempts == [8, 4, 2, 2, 2, 2, 2]  # 8 and 4 fail once; 2 is kept for the rest
    assert [len(batch) for batch, _ in results] == [2, 2, 2, 2, 2]
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert "out of memory at batch size 8, retrying at 4" in caplog.records[0].getMessage()


def test_a_later_loop_of_the_same_kind_starts_at_the_size_that_fit(caplog) -> None:
    first: list[int] = []
    list(backed_off(range(10), failing_above(2, first), batch_size=8, desc="suppress"))
    again, other = [], []
    with caplog.at_level(logging.INFO, logger="engine.runtime.batching"):
        results = list(backed_off(range(10), failing_above(2, again), batch_size=8, desc="suppress"))
    list(backed_off(range(10), failing_above(2, other), batch_size=8, desc="force"))
    assert first[:3] == [8, 4, 2] and again == [2, 2, 2, 2, 2]  # no failed attempt the second time
    assert [i for batch, _ in results for i in batch] == list(range(10))
    assert other[:3] == [8, 4, 2]  # another kind of loop finds its own size
    assert "suppress: batch size 2 (an earlier suppress loop ran out of memory at more)" in caplog.text


def test_backed_off_handles_the_cpu_allocator_failure() -> None:
    attempts: list[int] = []

    def work(batch: list[int]) -> int:
        attempts.append(len(batch))
        if len(batch) > 1:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                               "you tried to allocate 123 bytes.")
        return batch[0]

    assert [r for _, r in backed_off([0, 1, 2], work, batch_size=3)] == [0, 1, 2]
    assert attempts == [3, 1, 1, 1]


def test_backed_off_fails_clearly_at_batch_size_one_and_passes_other_errors() -> None:
    with pytest.raises(ExplorerError, match="capture: out of memory on a single prompt.*device_map"):
        list(backed_off([0, 1], failing_above(0, []), batch_size=4, desc="capture"))
    with pytest.raises(RuntimeError, match="out of memory") as raised:  # not an allocator failure
        list(backed_off([0, 1], failing_above(0, [], RuntimeError), batch_size=2))
    assert not is_out_of_memory(raised.value)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(backed_off([0], failing_above(1, []), batch_size=0))


def engine_loops(model, sae) -> dict[str, object]:
    """Every batched loop of the engine, at batch size 4, on PROMPTS."""
    offsets = prompt_end_positions(model.tokenizer).offsets
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    sequences = [model.tokenizer(text, add_special_tokens=False)["input_ids"] for text in PROMPTS]
    gradients = metric_gradients(model, PROMPTS, hooks, offsets, RefusalMetric("refusal_score", (5, 6)), batch_size=4)
    ce = ce_loss_recovered(model, sae, sequences, batch_size=4)
    return {
        "capture": capture(model, PROMPTS, hooks, offsets, batch_size=4),
        "capture_tokens": capture_tokens(model, sequences, hooks, batch_size=4).values,
        "logprobs": next_token_logprobs(model, PROMPTS, batch_size=4),
        "cross_entropy": completion_cross_entropy(model, PROMPTS, ["I can help", "Sure"] * 3 + ["Here"], batch_size=4),
        "generate": [g.text for g in generate(model, PROMPTS, max_new_tokens=3, batch_size=4)],
        "gradients": gradients.gradients,
        "metric": gradients.metric,
        "ce_loss_recovered": [ce.clean, ce.spliced, ce.zero_ablated],
    }


def test_every_engine_loop_backs_off_to_the_same_results(tiny_model) -> None:
    sae = train_sae(SaeTraining(architecture="topk", expansion=2, k=4, steps=5, batch_size=32, lr=1e-3),
                    torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), "blocks.1.hook_resid_pre", "x")
    plain = engine_loops(tiny_model, sae)
    sizes: list[int] = []

    def out_of_memory_above_two(activation: torch.Tensor, hook: object) -> torch.Tensor:
        sizes.append(activation.shape[0])
        if activation.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return activation

    with applied(tiny_model, [("blocks.0.hook_resid_pre", out_of_memory_above_two)]):
        backed = engine_loops(tiny_model, sae)
        sizes.clear()
        capture(tiny_model, PROMPTS, ["blocks.0.hook_resid_post"], [-1], batch_size=4)
        assert sizes == [2, 2, 2, 1]  # the earlier capture loop's size: no failed attempt
        sizes.clear()
        batching._fitted_sizes.clear()
        capture(tiny_model, PROMPTS, ["blocks.0.hook_resid_post"], [-1], batch_size=4)
    assert sizes == [4, 2, 2, 2, 1]  # 7 prompts: one failed batch of 4, then 2 kept for the rest
    assert backed["generate"] == plain.pop("generate")
    for name, expected in plain.items():
        np.testing.assert_allclose(np.asarray(backed[name]), np.asarray(expected), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
