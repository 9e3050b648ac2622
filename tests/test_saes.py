"""SAEs through SAELens: training path, top-k examples, save/load, quality numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse

from engine.errors import ExplorerError
from engine.runtime.activations import capture_tokens
from engine.saes import training as saes
from engine.saes.features import (
    baseline_means,
    check_feature,
    decoder_cosines,
    feature_attribution,
    feature_on_text,
    logit_effects,
    summarize,
    token_activations,
    top_texts,
)
from engine.saes.training import (
    ActivationRows,
    SaeTraining,
    check_sae_fits,
    load_sae,
    sae_quality,
    save_sae,
    train_sae,
)


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


def test_bad_sae_settings_are_clear_errors(sparse_activations) -> None:
    with pytest.raises(ExplorerError, match="saes.architecture = 'gated2' is not one of the choices"):
        SaeTraining(architecture="gated2")
    with pytest.raises(ExplorerError, match="Only 10 activation rows"):
        train_sae(SaeTraining(batch_size=64), sparse_activations[:10], "blocks.0.hook_resid_pre", "m")


def test_attribution_splits_the_linear_effect_exactly(trained, sparse_activations) -> None:
    """Features plus error term add up to (x - mean baseline) . gradient, position by position."""
    generator = torch.Generator().manual_seed(1)
    x = sparse_activations[:12].reshape(4, 3, 16).numpy()
    baseline = sparse_activations[100:110].reshape(5, 2, 16)[:, :1].expand(5, 3, 16).numpy().copy()
    gradients = torch.randn(4, 3, 16, generator=generator).numpy()
    attribution = feature_attribution(trained, x, gradients, baseline_means(trained, baseline))
    total = attribution.feature_effects.sum(1) + attribution.error_effects
    expected = ((x - baseline.mean(0)) * gradients).sum((1, 2))
    assert np.allclose(total, expected, atol=1e-3)
    assert attribution.feature_effects.shape == (4, 64)


def test_feature_statistics_on_known_codes() -> None:
    codes = sparse.csc_array(np.array([[0, 2.0], [1.0, 0], [3.0, 4.0], [0, 1.0], [2.0, 0]]))
    text_index, position = np.array([0, 0, 1, 1, 2]), np.array([1, 2, 1, 2, 1])
    summary = summarize(codes, bins=2)
    assert summary.density.tolist() == [0.6, 0.6] and summary.max_activation.tolist() == [3.0, 4.0]
    assert summary.histogram.tolist() == [[1, 2], [1, 2]]  # [0, 1.5), [1.5, 3] and [0, 2), [2, 4]
    top = top_texts(codes, text_index, position, k=2)
    assert list(zip(top.feature.tolist(), top.text_index.tolist(), top.position.tolist(), strict=True)) == [
        (0, 1, 1), (0, 2, 1), (1, 1, 1), (1, 0, 1)]
    assert token_activations(codes, text_index, position, feature=1, text=1, length=4).tolist() == [0, 4, 1, 0]
    assert top_texts(codes, text_index, position, k=1).activation.tolist() == [3.0, 4.0]  # the true maxima


def test_top_texts_break_ties_by_text_not_by_row_order_or_float_noise() -> None:
    # Feature 0 peaks at 0.5 (up to float noise) in texts 2, 0 and 1, stored in that row order.
    codes = sparse.csc_array(np.array([[0.5 + 1e-9], [0.5], [0.5 - 1e-9], [0.25]]))
    top = top_texts(codes, np.array([2, 0, 1, 3]), np.array([4, 4, 4, 1]), k=2)
    assert top.text_index.tolist() == [0, 1]


def test_feature_ids_out_of_range_are_clear_errors(trained, tiny_model) -> None:
    with pytest.raises(ExplorerError, match="Feature 64 does not exist: this SAE has 64 features"):
        check_feature(trained, 64)
    with pytest.raises(ExplorerError, match="Feature -1 does not exist"):
        feature_on_text(tiny_model, trained, -1, "hello", as_chat_prompt=True)


def test_logit_effects_and_cosines_read_the_decoder(trained) -> None:
    unembedding = torch.eye(16)  # token t's logit is the decoder's coordinate t
    top, bottom = logit_effects(trained, unembedding, k=2)
    decoder = trained.W_dec.detach().numpy()
    assert top[0].tolist() == np.argsort(-decoder[0])[:2].tolist()
    assert bottom[0].tolist() == np.argsort(decoder[0])[:2].tolist()
    cosines = decoder_cosines(trained, decoder[3] * 5)
    assert cosines[3] == pytest.approx(1, abs=1e-5) and np.abs(cosines).max() <= 1 + 1e-5


def test_sae_that_does_not_fit_the_model_is_a_clear_error(trained, tiny_model) -> None:
    with pytest.raises(ExplorerError, match="has d_in=16, but .* has d_model=64"):
        check_sae_fits(trained, tiny_model)  # the hook exists, the width does not match
    trained.cfg.metadata.hook_name = "blocks.7.hook_resid_pre"
    try:
        with pytest.raises(ExplorerError, match="reads hook 'blocks.7.hook_resid_pre', which .* does not have"):
            check_sae_fits(trained, tiny_model)
    finally:
        trained.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"


def test_unknown_pretrained_release_is_a_clear_error() -> None:
    with pytest.raises(ExplorerError, match="Could not load pretrained SAE no-such-release/layer_3.*Fix: check"):
        load_sae("no-such-release", "layer_3")


def test_autocast_training_still_learns(sparse_activations) -> None:
    training = SaeTraining(architecture="topk", expansion=4, k=4, steps=300, batch_size=256, lr=3e-3, autocast=True)
    sae = train_sae(training, sparse_activations[:5000], "blocks.0.hook_resid_pre", "synthetic")
    assert sae.W_dec.dtype == torch.float32  # weights stay float32
    assert sae_quality(sae, sparse_activations[5000:]).fraction_variance_unexplained < 0.3


def test_sae_training_and_loading_run_on_the_device_asked_for(sparse_activations, monkeypatch, tmp_path) -> None:
    """The device reaches SAELens' SAE config, trainer config and loader (CPU unless asked)."""
    seen: list[tuple[str, str]] = []
    config_class, sae_class = saes.ARCHITECTURES["topk"]
    trainer_config, load_from_disk = saes.SAETrainerConfig, saes.SAE.load_from_disk

    def recorded(kind: str, build):
        def record(*args, device: str, **options):
            seen.append((kind, device))
            return build(*args, device="cpu", **options)  # this machine has only a CPU
        return record

    monkeypatch.setitem(saes.ARCHITECTURES, "topk", (recorded("sae", config_class), sae_class))
    monkeypatch.setattr(saes, "SAETrainerConfig", recorded("trainer", trainer_config))
    monkeypatch.setattr(saes.SAE, "load_from_disk", recorded("load", load_from_disk))
    training = SaeTraining(architecture="topk", expansion=2, k=4, steps=3, batch_size=64, lr=1e-3)
    sae = train_sae(training, sparse_activations[:500], "blocks.0.hook_resid_pre", "m", device=torch.device("cuda", 1))
    assert seen == [("sae", "cuda:1"), ("trainer", "cuda:1"), ("load", "cuda:1")]
    seen.clear()
    train_sae(training, sparse_activations[:500], "blocks.0.hook_resid_pre", "m")
    load_sae(str(save_sae(sae, tmp_path / "sae")), device="cuda:0")
    assert seen == [("sae", "cpu"), ("trainer", "cpu"), ("load", "cpu"), ("load", "cuda:0")]


def test_training_and_quality_read_memory_mapped_rows_like_a_tensor(sparse_activations, tmp_path) -> None:
    """An SAE trained on some rows of a memory-mapped [n, hooks, d] array equals one trained on
    those rows in memory; the quality numbers agree."""
    on_disk = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=(6000, 2, 16))
    on_disk[:, 1] = sparse_activations.numpy()
    del on_disk
    values = np.load(tmp_path / "a.npy", mmap_mode="r")
    train_rows = np.flatnonzero(np.arange(6000) % 5 != 0)
    training = SaeTraining(architecture="topk", expansion=2, k=4, steps=30, batch_size=64, lr=3e-3)
    from_disk = train_sae(training, ActivationRows(values, 1, train_rows), "blocks.0.hook_resid_pre", "m")
    in_memory = train_sae(training, sparse_activations[train_rows], "blocks.0.hook_resid_pre", "m")
    assert torch.equal(from_disk.W_dec, in_memory.W_dec) and torch.equal(from_disk.W_enc, in_memory.W_enc)
    held_out = np.flatnonzero(np.arange(6000) % 5 == 0)
    chunked = sae_quality(from_disk, ActivationRows(values, 1, held_out), batch_size=100)
    whole = sae_quality(from_disk, sparse_activations[held_out])
    assert chunked.l0 == pytest.approx(whole.l0) and chunked.dead_fraction == whole.dead_fraction
    assert chunked.fraction_variance_unexplained == pytest.approx(whole.fraction_variance_unexplained, rel=1e-5)


def test_capture_tokens_spills_to_a_memory_mapped_file(tiny_model, tmp_path) -> None:
    sequences = [tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]
                 for text in ("Name a fruit please", "Describe a cat", "Tell me about rivers in Europe")]
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    in_memory = capture_tokens(tiny_model, sequences, hooks, batch_size=2)
    spilled = capture_tokens(tiny_model, sequences, hooks, batch_size=2, spill=tmp_path / "acts.f32")
    assert isinstance(spilled.values, np.memmap) and not spilled.values.flags.writeable
    assert spilled.values.shape == in_memory.values.shape == (len(in_memory.text_index), 2, 64)
    assert np.array_equal(spilled.values, in_memory.values)
    assert np.array_equal(spilled.position, in_memory.position)
