"""Statistics of SAE features over a token corpus, in the manner of SAE dashboards.

Codes are kept sparse (scipy CSC, one column per feature): a TopK or JumpReLU SAE fires a few
dozen latents per token, so the whole corpus fits in memory however wide the SAE is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from jaxtyping import Float, Int
from sae_lens import SAE
from scipy import sparse

from engine.errors import ExplorerError
from engine.runtime.activations import capture_tokens, sae_tokens
from engine.runtime.chat import chat_prompt
from engine.runtime.models import LoadedModel
from engine.saes.training import check_sae_fits


def encode_sparse(sae: SAE, values: Float[np.ndarray, "n_tokens d_in"], batch_size: int = 4096) -> sparse.csc_array:
    """SAE codes of [n_tokens, d_in] activations (in memory or a read-only memmap, read
    `batch_size` rows at a time) as a sparse [n_tokens, d_sae] matrix."""
    blocks = []
    with torch.inference_mode():
        for start in range(0, len(values), batch_size):
            chunk = torch.from_numpy(np.array(values[start:start + batch_size])).to(sae.device)  # a writable copy
            blocks.append(sparse.csr_array(sae.encode(chunk).float().cpu().numpy()))
    if not blocks:
        return sparse.csc_array((0, sae.cfg.d_sae), dtype=np.float32)
    return cast(sparse.csc_array, sparse.vstack(blocks).tocsc())  # arrays in, an array out (scipy is untyped)


def check_feature(sae: SAE, feature: int) -> None:
    if not 0 <= feature < sae.cfg.d_sae:
        raise ExplorerError(f"Feature {feature} does not exist: this SAE has {sae.cfg.d_sae} features.",
                            f"pick a feature id in 0..{sae.cfg.d_sae - 1}.")


@dataclass(frozen=True)
class FeatureSummary:
    """Per feature: firing density and the distribution of its non-zero activations."""

    density: np.ndarray  # [d_sae] fraction of tokens where the feature fires
    max_activation: np.ndarray  # [d_sae]
    mean_activation: np.ndarray  # [d_sae] mean over the tokens where it fires (NaN if never)
    histogram: np.ndarray  # [d_sae, bins] counts of non-zero activations in bins of [0, max]


def summarize(codes: sparse.csc_array, bins: int) -> FeatureSummary:
    n_tokens, d_sae = cast(tuple[int, int], codes.shape)  # scipy infers its shape as possibly None
    counts = np.diff(codes.indptr)
    density = counts / max(n_tokens, 1)
    histogram = np.zeros((d_sae, bins), dtype=np.int64)
    maxima, means = np.zeros(d_sae), np.full(d_sae, np.nan)
    for feature in np.flatnonzero(counts):
        values = codes.data[codes.indptr[feature]:codes.indptr[feature + 1]]
        maxima[feature], means[feature] = values.max(), values.mean()
        histogram[feature] = np.histogram(values, bins=bins, range=(0.0, float(values.max())))[0]
    return FeatureSummary(density, maxima, means, histogram)


@dataclass(frozen=True)
class TopExamples:
    """Per feature, its top texts by maximum activation (one row per (feature, rank))."""

    feature: np.ndarray
    rank: np.ndarray
    text_index: np.ndarray
    position: np.ndarray  # the token where the feature peaks in that text
    activation: np.ndarray


def top_texts(codes: sparse.csc_array, text_index: np.ndarray, position: np.ndarray, k: int) -> TopExamples:
    """Each feature's k texts with the highest peak activation (a text counted once). Peaks equal to
    5 decimals rank by text index: template tokens after the same prefix tie exactly, and which of them
    float noise (another batch, another shard) puts first must not decide which texts are shown."""
    columns: list[tuple[int, int, int, int, float]] = []
    for feature in range(cast(tuple[int, int], codes.shape)[1]):
        rows = codes.indices[codes.indptr[feature]:codes.indptr[feature + 1]]
        if len(rows) == 0:
            continue
        values = codes.data[codes.indptr[feature]:codes.indptr[feature + 1]]
        order = np.lexsort((text_index[rows], -np.round(values, 5)))
        _, first = np.unique(text_index[rows[order]], return_index=True)  # each text's peak
        best = order[np.sort(first)][:k]
        columns += [(feature, rank, int(text_index[rows[i]]), int(position[rows[i]]), float(values[i]))
                    for rank, i in enumerate(best)]
    table = np.array(columns, dtype=np.float64).reshape(-1, 5)
    as_int = table[:, :4].astype(np.int64).T
    return TopExamples(as_int[0], as_int[1], as_int[2], as_int[3], table[:, 4])


def token_activations(codes: sparse.csc_array, text_index: np.ndarray, position: np.ndarray,
                      feature: int, text: int, length: int) -> np.ndarray:
    """One feature's activation at every position of one text (0 where it is silent or skipped)."""
    start, end = codes.indptr[feature], codes.indptr[feature + 1]
    rows, values = codes.indices[start:end], codes.data[start:end]
    mine = text_index[rows] == text
    out = np.zeros(length, dtype=np.float32)
    out[position[rows[mine]]] = values[mine]
    return out


def logit_effects(sae: SAE, unembedding: Float[torch.Tensor, "d_vocab d_model"], k: int, chunk: int = 256
                  ) -> tuple[Int[np.ndarray, "d_sae k"], Int[np.ndarray, "d_sae k"]]:
    """Token ids each feature's decoder direction promotes most and suppresses most through the
    unembedding [d_vocab, d_model]: ([d_sae, k] top ids, [d_sae, k] bottom ids)."""
    top, bottom = [], []
    with torch.inference_mode():
        for block in sae.W_dec.detach().float().split(chunk):
            logits = block @ unembedding.detach().float().to(block.device).T
            top.append(logits.topk(k, dim=1).indices.cpu().numpy())
            bottom.append((-logits).topk(k, dim=1).indices.cpu().numpy())
    return np.concatenate(top), np.concatenate(bottom)


def decoder_cosines(sae: SAE, direction: Float[np.ndarray, " d_in"]) -> Float[np.ndarray, " d_sae"]:
    """Cosine of each feature's decoder direction with `direction` [d_in]."""
    decoder = sae.W_dec.detach().float().cpu().numpy()
    unit_direction = direction / (np.linalg.norm(direction) or 1.0)
    return decoder @ unit_direction / np.maximum(np.linalg.norm(decoder, axis=1), 1e-12)


@dataclass(frozen=True)
class NodeAttribution:
    """Attribution-patching effects on a metric, per prompt."""

    feature_effects: np.ndarray  # [n_prompts, d_sae]
    error_effects: np.ndarray  # [n_prompts] the SAE error term's effect


def baseline_means(sae: SAE, activations: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean codes [n_positions, d_sae] and mean error term [n_positions, d_in] of an SAE over
    reference activations [m, n_positions, d_in]: the baseline attribution patches towards (on
    the SAE's device)."""
    if len(activations) == 0:
        raise ExplorerError("No baseline prompts.", "the baseline group needs at least one prompt.")
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(activations, dtype=np.float32)).to(sae.device)
        codes = sae.encode(x)
        return codes.mean(0), (x - sae.decode(codes)).mean(0)


def feature_attribution(sae: SAE, activations: np.ndarray, gradients: np.ndarray,
                        baseline: tuple[torch.Tensor, torch.Tensor]) -> NodeAttribution:
    """(f - f_baseline) * (W_dec . grad), summed over positions, for activations and gradients
    [n, n_positions, d_in]; `baseline` is (codes, error) from `baseline_means`, position by position."""
    base_codes, base_error = baseline
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(activations, dtype=np.float32)).to(sae.device)
        codes = sae.encode(x)
        error = x - sae.decode(codes)
        grad = torch.from_numpy(np.ascontiguousarray(gradients, dtype=np.float32)).to(sae.device)
        decoder_grad = grad @ sae.W_dec.detach().float().T  # [n, positions, d_sae]
        effects = ((codes - base_codes) * decoder_grad).sum(1)
        error_effects = ((error - base_error) * grad).sum((1, 2))
    return NodeAttribution(effects.cpu().numpy(), error_effects.cpu().numpy())


@dataclass(frozen=True)
class TextActivations:
    tokens: list[str]
    activations: np.ndarray  # [n_tokens] the feature's activation at each token (0 where not read)


def feature_on_text(model: LoadedModel, sae: SAE, feature: int, text: str, *, as_chat_prompt: bool) -> TextActivations:
    """One feature's activation at every token of `text` (optionally chat-formatted), live."""
    check_feature(sae, feature)
    hook = check_sae_fits(sae, model)
    tokenizer = model.tokenizer
    if as_chat_prompt:
        text = chat_prompt(tokenizer, text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ExplorerError("The text is empty.", "type some text to encode.")
    read = sae_tokens(tokenizer, chat=as_chat_prompt)  # the tokens the SAEs were trained on
    captured = capture_tokens(model, [ids], [hook], batch_size=1, skip_token_ids=read.skip_token_ids,
                              skip_first=read.skip_first, desc="encode text")
    activations = np.zeros(len(ids), dtype=np.float32)
    with torch.inference_mode():
        codes = sae.encode(torch.from_numpy(captured.values[:, 0]).to(sae.device))
    activations[captured.position] = codes[:, feature].cpu().numpy()
    return TextActivations([tokenizer.decode([i]) for i in ids], activations)
