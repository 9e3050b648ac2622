"""Refusal direction optimisation on a tiny model with a planted two-dimensional refusal subspace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.data.prompt_sources import load_builtin
from engine.directions.rdo import RdoSettings, optimise_refusal_directions, refusal_loss
from engine.errors import ExplorerError
from engine.judging.judge import refusal_score
from engine.runtime.interventions import ablation_hooks, applied
from engine.runtime.models import load_model
from engine.runtime.scoring import next_token_logprobs
from tests.conftest import refusal_raising_directions


@pytest.fixture
def planted(tiny_model_dir):
    """A fresh tiny model whose "toxic" prompts carry refusal along one of two orthogonal directions: a
    trigger word adds 8a (half of them) or 8b (the other half) to every token's embedding, with a and b
    the directions that raise the refusal tokens' logits. One direction cannot remove both; their span can."""
    model = load_model(str(tiny_model_dir), device="cpu")
    tokenizer = model.tokenizer
    refusal_ids, a, b = refusal_raising_directions(model)
    triggers = {tokenizer.convert_tokens_to_ids("Here"): a, tokenizer.convert_tokens_to_ids("Sure"): b}

    def plant(module, inputs, output):
        for trigger, direction in triggers.items():
            rows = (inputs[0] == trigger).any(dim=1)
            output = output + rows[:, None, None].to(output.dtype) * torch.from_numpy(8.0 * direction).float()
        return output

    handle = model.hf_model.get_input_embeddings().register_forward_hook(plant)
    safe_texts = load_builtin().query("kind == 'safe'")["text"].tolist()
    safe, rest = safe_texts[:16], safe_texts[16:32]
    toxic = [t + " Here" for t in rest[:8]] + [t + " Sure" for t in rest[8:]]
    yield model, refusal_ids, a, b, safe, toxic
    handle.remove()


def _toxic_score(model, toxic, refusal_ids, directions=None) -> float:
    hooks = ablation_hooks(model, torch.from_numpy(np.asarray(directions, np.float32))) if directions is not None else []
    with applied(model, hooks):
        return float(refusal_score(next_token_logprobs(model, toxic, batch_size=32, token_ids=refusal_ids)).mean())


def test_rdo_recovers_a_planted_two_dimensional_subspace_that_one_direction_cannot_remove(planted) -> None:
    model, refusal_ids, a, b, safe, toxic = planted
    planted_score = _toxic_score(model, toxic, refusal_ids)
    removed = planted_score - _toxic_score(model, toxic, refusal_ids, np.stack([a, b]))
    assert removed > 0.5  # the plant raises refusal, and the span of a and b takes it away

    def share_removed(directions: np.ndarray) -> float:
        return (planted_score - _toxic_score(model, toxic, refusal_ids, directions)) / removed

    cone = optimise_refusal_directions(model, toxic, safe, refusal_ids, RdoSettings(k=2, steps=200, lr=0.1))
    single = optimise_refusal_directions(model, toxic, safe, refusal_ids, RdoSettings(k=1, steps=200, lr=0.1))
    assert np.allclose(cone.directions @ cone.directions.T, np.eye(2), atol=1e-5)  # orthonormal
    # The refusal term flattens as refusal becomes unlikely, and the tiny model's refusal tokens are
    # unlikely to begin with (log-odds -6.5 planted, -7.6 not): the search gets close, not all the way.
    assert np.linalg.norm(cone.directions @ a) > 0.9 and np.linalg.norm(cone.directions @ b) > 0.9
    assert share_removed(cone.directions) > 0.85
    assert share_removed(single.directions) < 0.7  # the best single direction leaves part of it
    assert cone.history["loss"].iloc[-1] < cone.history["loss"].iloc[0]


def test_rdo_settings_and_inputs_are_checked(tiny_model) -> None:
    with pytest.raises(ExplorerError, match="RDO settings out of range"):
        RdoSettings(k=0)
    with pytest.raises(ExplorerError, match="toxic and safe prompts"):
        optimise_refusal_directions(tiny_model, [], ["x"], [1], RdoSettings())


def test_the_refusal_term_has_a_floor_so_kl_decides_once_refusal_is_gone() -> None:
    # two refusal tokens; log-odds of refusal +3, 0 and -30
    log_p = torch.log(torch.sigmoid(torch.tensor([3.0, 0.0, -30.0])))
    tokens = torch.stack([log_p - np.log(2), log_p - np.log(2)], dim=1).requires_grad_(True)
    loss = refusal_loss(tokens)
    assert loss.detach().numpy() == pytest.approx([np.log1p(np.exp(3.0)), np.log(2.0), 0.0], abs=1e-5)
    loss.sum().backward()
    assert tokens.grad is not None and tokens.grad[2].abs().max() < 1e-9  # nothing left to gain there
