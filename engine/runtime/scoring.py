"""Forward-pass measurements: next-token log-probabilities at the first response position,
KL divergence between two such distributions, and cross-entropy of given completions.

Every function runs under whatever interventions are attached (engine.runtime.interventions.applied).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from jaxtyping import Float

from engine.runtime.generation import EncodedBatch, map_encoded, map_right_padded
from engine.runtime.models import LoadedModel
from engine.saes.corpus import chat_sequences


def next_token_logprobs(
    model: LoadedModel,
    instructions: Sequence[str],
    *,
    batch_size: int,
    token_ids: Sequence[int] | None = None,
) -> Float[np.ndarray, "n vocab"]:
    """Log-softmax at the first response position: [n, d_vocab], or [n, len(token_ids)]."""
    rows: list[np.ndarray | None] = [None] * len(instructions)
    wanted = None if token_ids is None else torch.tensor(list(token_ids), dtype=torch.long)

    def forward(batch: list[int], encoded: EncodedBatch) -> np.ndarray:
        with torch.inference_mode():
            # logits_to_keep=1: only the last position's logits (the vocab projection is costly)
            logits = model.hf_model(**encoded.forward_inputs(), logits_to_keep=1).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # on the last layer's device under a device_map
        return (logprobs if wanted is None else logprobs[:, wanted.to(logprobs.device)]).cpu().numpy()

    for batch, logprobs in map_encoded(model, instructions, batch_size, forward, desc="next-token log-probs"):
        for row, index in enumerate(batch):
            rows[index] = logprobs[row]
    width = len(token_ids) if token_ids is not None else 0
    # map_encoded's batches cover every index, so no row is left None.
    return np.stack(cast(list[np.ndarray], rows)) if rows else np.zeros((0, width), dtype=np.float32)


def kl_divergence(reference: Float[np.ndarray, "n vocab"], other: Float[np.ndarray, "n vocab"]
                  ) -> Float[np.ndarray, " n"]:
    """KL(reference || other) per row, from log-probabilities [n, d_vocab]."""
    return np.sum(np.exp(reference) * (reference - other), axis=-1)


def completion_cross_entropy(
    model: LoadedModel, instructions: Sequence[str], completions: Sequence[str], *, batch_size: int
) -> np.ndarray:
    """Mean cross-entropy (nats/token) of each completion given its chat-formatted instruction."""
    sequences, prompt_lengths = chat_sequences(model.tokenizer, instructions, completions)
    result = np.full(len(instructions), np.nan)

    base = model.hf_model.base_model
    unembed = cast(torch.nn.Module, model.hf_model.get_output_embeddings())
    unembed_device = next(unembed.parameters()).device

    def forward(batch: list[int], ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        # Each completion token is predicted at the position before it: [start - 1, end - 1) of its row.
        spans = [(row, int(prompt_lengths[i]), len(sequences[i])) for row, i in enumerate(batch)]
        rows = torch.tensor([row for row, start, end in spans for _ in range(start, end)], dtype=torch.long)
        columns = torch.tensor([c for _, start, end in spans for c in range(start - 1, end - 1)], dtype=torch.long)
        with torch.inference_mode():
            hidden = base(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).last_hidden_state
            # The vocabulary projection only where a completion token is predicted: it is the costliest
            # matmul, and its log-softmax the largest array, at every other position for nothing.
            picked = hidden[rows.to(hidden.device), columns.to(hidden.device)].to(unembed_device)
            logprobs = torch.log_softmax(unembed(picked).float(), -1)
            token_losses = -logprobs.gather(-1, ids[rows, columns + 1][:, None].to(logprobs.device))[:, 0].cpu()
        losses = np.full(len(batch), np.nan)
        offset = 0
        for row, start, end in spans:
            if end > start:  # an empty completion has no cross-entropy
                losses[row] = float(token_losses[offset:offset + end - start].mean())
            offset += end - start
        return losses

    for batch, losses in map_right_padded(sequences, batch_size, model.tokenizer.pad_token_id, forward,
                                          desc="completion cross-entropy"):
        result[batch] = losses
    return result
