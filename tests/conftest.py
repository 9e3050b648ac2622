"""Shared fixtures: a tiny Llama-shaped chat model built in-process, and an isolated data dir."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.paths import BUILTIN_PROMPTS

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]


def _vocabulary() -> list[str]:
    words = set(re.findall(r"\w+|[^\w\s]", BUILTIN_PROMPTS.read_text(encoding="utf-8")))
    words |= {"system", "user", "assistant", "I", "'", "m", "sorry", "can", "t", "help", "Sure", "Here"}
    return SPECIALS + sorted(words)


def build_tiny_model(target: Path, *, seed: int = 0, n_layers: int = 2) -> Path:
    """Save a random 2-layer Llama with a word-level ChatML tokenizer, like a real HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<pad>"],
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = vocab["<|im_end|>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from engine.runtime.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


def tiny_study_settings(store: Path, model_dir: Path) -> dict:
    """A study config (as parsed YAML) running every stage on the tiny model in seconds."""
    return {
        "study": "tiny", "store": str(store),
        "models": {"base": str(model_dir), "other": str(model_dir)},
        "prompts": {"test_fraction": 0.05},
        "generation": {"max_new_tokens": 2, "batch_size": 64, "chunk_size": 512},
        # The built-in set again as a held-out set: its train prompts are left out, its test prompts stay.
        "evaluation": {"sets": [{"name": "builtin_again", "source": {"type": "builtin"}}], "max_new_tokens": 2},
        # filter_by_refusal off: the random tiny model refuses no prompt, so the filter would keep no toxic one.
        "directions": {"model": "other", "max_validation_prompts": 4, "bootstrap": 10, "eval_max_new_tokens": 2,
                       "prune_last_fraction": 0.0, "max_kl": 10.0, "validation_fraction": 0.3,
                       "filter_by_refusal": False},
        "saes": {"model": "other", "hooks": ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"], "expansion": 2,
                 "k": 8, "steps": 40, "batch_size": 128, "lr": 3e-3, "attribution_prompts": 8, "top_examples": 3},
        "steering": {"model": "other", "top_features": 1, "eval_max_new_tokens": 2},
        "circuits": {"model": "other", "max_prompts": 8, "max_nodes": 6, "stored_nodes": 20,
                     "faithfulness_sizes": [3], "bootstrap": 20, "permutations": 49, "split_halves": 4,
                     "patch_prompts": 4, "exact_sites": 1},
    }


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A study store with every stage, built from the tiny model (shared by the app tests)."""
    from precompute import pipeline
    from precompute.config import parse_config
    from precompute.stages import STAGES

    path = tmp_path_factory.mktemp("study") / "tiny.duckdb"
    config = parse_config(tiny_study_settings(path, tiny_model_dir))
    pipeline.run_pipeline(config, STAGES)
    return path


@pytest.fixture(autouse=True)
def isolated_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Generated artifacts of a test go to its own folder, never to the repo's data/."""
    data = tmp_path / "data"
    monkeypatch.setenv("REFUSAL_EXPLORER_DATA", str(data))
    return data


@pytest.fixture(scope="session", autouse=True)
def few_threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_dataset(*parts: str) -> Path:
    path = SHARED_DATASETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"public dataset {path} is not on this machine (see ../shared/datasets/README.md)")
    return path


def refusal_raising_directions(model) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The refusal token ids ("sorry", "I") of a tiny model and two orthonormal directions that raise their
    logits: the unembedding direction of "sorry", and that of "I" with the first projected out."""
    refusal_ids = [model.tokenizer.convert_tokens_to_ids(t) for t in ("sorry", "I")]
    unembed = model.hf_model.get_output_embeddings().weight.detach().numpy()
    a = unembed[refusal_ids[0]] / np.linalg.norm(unembed[refusal_ids[0]])
    b = unembed[refusal_ids[1]] - (unembed[refusal_ids[1]] @ a) * a
    return refusal_ids, a, b / np.linalg.norm(b)
