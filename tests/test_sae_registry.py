"""Pretrained SAE releases are checked against the study model at config parse time, offline."""

from __future__ import annotations

import pytest

from engine.errors import ExplorerError
from engine.saes.registry import check_release, model_family
from precompute.config import parse_config


@pytest.mark.parametrize(("name", "family"), [
    ("google/gemma-2-2b-it", "gemma-2-2b"),
    ("gemma-2-2b", "gemma-2-2b"),
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-7b-v0.2"),
    ("meta-llama/Llama-2-7b-chat-hf", "llama-2-7b-hf"),
    ("Qwen/Qwen3-1.7B-Base", "qwen3-1.7b"),
    ("/models/gemma-2-2b-it/", "gemma-2-2b"),
])
def test_model_family_drops_organisation_case_and_variant_words(name, family) -> None:
    assert model_family(name) == family


def test_base_model_release_fits_its_chat_model() -> None:
    check = check_release("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical", "google/gemma-2-2b-it")
    assert check.release_model == "gemma-2-2b" and not check.exact
    assert check_release("gemma-scope-9b-it-res-canonical", "layer_20/width_16k/canonical",
                         "google/gemma-2-9b-it").exact


@pytest.mark.parametrize(("release", "sae_id", "model", "message"), [
    ("llama_scope_lxr_8x", "l12r_8x", "google/gemma-2-2b-it",
     "holds SAEs of meta-llama/Llama-3.1-8B, but the SAE model is google/gemma-2-2b-it"),
    ("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical", "google/gemma-2-9b-it",
     "gemma-2-2b is not gemma-2-9b"),
    ("mistral-7b-res-wg", "blocks.8.hook_resid_pre", "mistralai/Mistral-7B-Instruct-v0.2",
     "mistral-7b-v0.1 is not mistral-7b-v0.2"),  # a TransformerLens alias, resolved to its checkpoint
    ("gemma-scope-2b-pt-res-canonical", "layer_99/width_16k/canonical", "google/gemma-2-2b-it", "has no SAE"),
    ("gemma-scope-2b-res", "layer_1", "google/gemma-2-2b-it", "not in SAELens' registry.*gemma-scope-2b-pt-res"),
])
def test_mismatched_or_unknown_release_is_a_clear_error(release, sae_id, model, message) -> None:
    with pytest.raises(ExplorerError, match=message) as raised:
        check_release(release, sae_id, model)
    assert raised.value.fix


def test_a_plain_hub_repo_is_left_to_the_load_time_check() -> None:
    assert check_release("someone/my-saes", "layer_3", "google/gemma-2-2b-it").release_model == ""


def _config(release: str, sae_id: str, model: str) -> dict:
    return {"study": "x", "models": {"base": model},
            "saes": {"model": "base", "pretrained": [{"release": release, "sae_id": sae_id}]}}


def test_config_parse_rejects_a_release_for_another_model() -> None:
    with pytest.raises(ExplorerError, match="release 'llama_scope_lxr_8x' holds SAEs of meta-llama/Llama-3.1-8B"):
        parse_config(_config("llama_scope_lxr_8x", "l12r_8x", "google/gemma-2-2b-it"))
    config = parse_config(_config("gemma-scope-2b-pt-res-canonical", "layer_8/width_16k/canonical",
                                  "google/gemma-2-2b-it"))
    assert config.saes.pretrained[0]["release"] == "gemma-scope-2b-pt-res-canonical"
