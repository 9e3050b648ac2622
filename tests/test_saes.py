"""SAEs through SAELens: training path, top-k examples, save/load, quality numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import ExplorerError
from engine.saes import SaeTraining, load_sae, sae_quality, save_sae, top_k_examples, train_sae


@pytest.fixture(scope="module")
def sparse_activations() -> torch.Tensor:
    """Tokens built from 3 of 32 hidden features each, in 16 dimensions."""
    generator = torch.Generator().manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(32, 16, generator=generator), dim=1)
    codes = torch.zeros(6000, 32)
    for row in range(6000):
        active = torch.randperm(32, generator=generator)[:3]
        codes[row, active] = torch.rand(3, generator=generator) * 4 + 1
    return codes @ dictionary


@pytest.fixture(scope="module")
def trained(sparse_activations):
    training = SaeTraining(architecture="topk", expansion=4, k=4, steps=300, batch_size=256, lr=3e-3)
    return train_sae(training, sparse_activations[:5000], "blocks.0.hook_resid_pre", "synthetic")


def test_trained_sae_beats_a_zero_reconstruction(trained, sparse_activations) -> None:
    held_out = sparse_activations[5000:]
    quality = sae_quality(trained, held_out)
    zero_fvu = float((held_out ** 2).sum() / ((held_out - held_out.mean(0)) ** 2).sum())
    assert quality.fraction_variance_unexplained < 0.3 < zero_fvu
    assert quality.l0 == pytest.approx(4, abs=0.01)  # top-k fires exactly k latents
    assert 0 <= quality.dead_fraction < 1
    assert trained.cfg.metadata.hook_name == "blocks.0.hook_resid_pre" and trained.cfg.d_sae == 64


def test_save_load_round_trip_is_exact(trained, sparse_activations, tmp_path) -> None:
    folder = save_sae(trained, tmp_path / "sae")
    loaded = load_sae(str(folder))
    batch = sparse_activations[:100]
    with torch.inference_mode():
        assert torch.equal(loaded.encode(batch), trained.encode(batch))
    assert loaded.cfg.metadata.hook_name == "blocks.0.hook_resid_pre"
    with pytest.raises(ExplorerError, match="cfg.json missing"):
        load_sae(str(tmp_path / "nothing"))


def test_top_k_examples_returns_true_maxima() -> None:
    activations = np.array([[0.1, 5.0], [3.0, 0.0], [2.0, 7.0], [9.0, 1.0], [0.0, 6.0]])
    index, values = top_k_examples(activations, k=3)
    assert index[:, 0].tolist() == [3, 1, 2] and values[:, 0].tolist() == [9.0, 3.0, 2.0]
    assert index[:, 1].tolist() == [2, 4, 0] and values[:, 1].tolist() == [7.0, 6.0, 5.0]


def test_bad_sae_settings_are_clear_errors(sparse_activations) -> None:
    with pytest.raises(ExplorerError, match="Unknown SAE architecture 'gated2'"):
        SaeTraining(architecture="gated2")
    with pytest.raises(ExplorerError, match="Only 10 activation rows"):
        train_sae(SaeTraining(batch_size=64), sparse_activations[:10], "blocks.0.hook_resid_pre", "m")
