"""Backup features (hydra): removing the top refusal feature wakes a planted backup downstream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.circuits.refusal_metric import RefusalMetric
from engine.data.prompt_sources import load_builtin
from engine.runtime.models import load_model
from engine.saes.backup_features import backup_features
from engine.saes.training import SaeTraining, build_training_sae

UP, DOWN = "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"


def _sae(model, hook: str, first: np.ndarray, seed: int):
    """A 64-feature standard SAE whose feature 0 reads and writes `first`; the rest random directions."""
    sae = build_training_sae(SaeTraining(architecture="standard", expansion=1), model.d_model, hook, model.name)
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(sae.cfg.d_sae, model.d_model))
    rows[0] = first
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(rows).float())
        sae.W_enc.copy_(torch.from_numpy(rows.T).float())
        sae.b_enc.fill_(-0.1)  # a feature fires only on a clear projection
        sae.b_dec.zero_()
    return sae


@pytest.fixture
def planted(tiny_model_dir):
    """Toxic prompts (a trigger word) carry 0.4a in every token's embedding; a backup mechanism after block 0
    writes 0.4b on those prompts whenever a is missing there. a and b are orthogonal and raise the refusal
    token's logit equally (each is half the unembedding direction of "sorry" plus or minus another)."""
    model = load_model(str(tiny_model_dir), device="cpu")
    tokenizer = model.tokenizer
    refusal_ids = [tokenizer.convert_tokens_to_ids("sorry")]
    unembed = model.hf_model.get_output_embeddings().weight.detach().numpy()
    u = unembed[refusal_ids[0]] / np.linalg.norm(unembed[refusal_ids[0]])
    v = np.random.default_rng(0).normal(size=u.shape)
    v -= (v @ u) * u
    v /= np.linalg.norm(v)
    a, b = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
    trigger = tokenizer.convert_tokens_to_ids("Here")
    flagged: dict[str, torch.Tensor] = {}
    a_t, b_t = torch.from_numpy(a).float(), torch.from_numpy(b).float()

    def plant(module, inputs, output):
        flagged["rows"] = (inputs[0] == trigger).any(dim=1)
        return output + flagged["rows"][:, None, None].to(output.dtype) * 0.4 * a_t

    def backup(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        missing = torch.relu(0.3 - hidden @ a_t) / 0.3 * 0.4 * flagged["rows"][:, None].to(hidden.dtype)
        hidden = hidden + missing[..., None] * b_t
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [model.hf_model.get_input_embeddings().register_forward_hook(plant)]
    yield model, refusal_ids, a, b, handles, backup
    for handle in handles:
        handle.remove()


def _run(model, refusal_ids, a, b):
    texts = load_builtin().query("kind == 'safe'")["text"].tolist()
    toxic, safe = [t + " Here" for t in texts[:12]], texts[12:24]
    up, down = _sae(model, UP, a, seed=1), _sae(model, DOWN, b, seed=2)
    return backup_features(model, UP, up, {DOWN: down}, toxic, safe, RefusalMetric("refusal_score", tuple(refusal_ids)),
                           ks=(1,), offsets=(-1, -2), batch_size=32)


def test_removing_the_top_feature_wakes_the_planted_backup_and_refusal_recovers(planted) -> None:
    model, refusal_ids, a, b, handles, backup = planted
    handles.append(model.hf_model.model.layers[0].register_forward_hook(backup))
    result = _run(model, refusal_ids, a, b)
    recovery = result.recovery.iloc[0]
    assert recovery["removed"] == [0]  # the feature reading a has the largest attribution
    gains = result.gains[result.gains["k"] == 1]
    assert gains.iloc[0]["feature"] == 0 and gains.iloc[0]["gain"] > 0  # the backup feature (reads b) gains most
    assert gains.iloc[0]["attribution_before"] == pytest.approx(0.0, abs=0.05)  # silent until needed
    assert recovery["recovered_share"] > 0.5


def test_without_a_backup_nothing_recovers(planted) -> None:
    model, refusal_ids, a, b, _, _ = planted
    result = _run(model, refusal_ids, a, b)
    recovery = result.recovery.iloc[0]
    assert recovery["removed"] == [0] and recovery["recovered_share"] < 0.5
    assert result.gains["gain"].max() < 0.05


def test_the_stage_removes_the_saes_stage_top_features_and_stores_recovery_and_gains(tiny_store) -> None:
    from engine.data import store

    recovery = store.read_table(tiny_store, "backup_recovery")
    features = store.read_table(tiny_store, "features")
    earliest = store.read_table(tiny_store, "saes").sort_values("layer")["hook"].iloc[0]
    ranked = features.query("hook == @earliest").sort_values("attribution", ascending=False)["feature"].tolist()
    assert recovery["k"].tolist() == [1, 3, 10] and (recovery["hook"] == earliest).all()
    for row in recovery.itertuples():  # removed in the saes stage's order (train prompts), measured on test
        assert row.removed == ", ".join(map(str, ranked[:row.k]))
        assert row.actual_drop == pytest.approx(row.metric_before - row.metric_after)
    gains = store.read_table(tiny_store, "backup_gains")
    assert set(gains["k"]) == {1, 3, 10} and (gains["hook"] != earliest).all()
    assert gains["gain"].to_numpy() == pytest.approx((gains["attribution_after"] - gains["attribution_before"]).to_numpy())
