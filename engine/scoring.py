"""Forward-pass measurements: next-token log-probabilities at the first response position,
KL divergence between two such distributions, and cross-entropy of given completions.

Every function runs under whatever interventions are attached (engine.interventions.applied).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.chat import chat_prompt
from engine.generation import encode_batches, length_sorted_batches
from engine.models import LoadedModel


def next_token_logprobs(
    model: LoadedModel,
    instructions: Sequence[str],
    *,
    batch_size: int,
    token_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Log-softmax at the first response position: [n, d_vocab], or [n, len(token_ids)]."""
    rows: list[np.ndarray | None] = [None] * len(instructions)
    wanted = None if token_ids is None else torch.tensor(list(token_ids), dtype=torch.long, device=model.device)
    for batch, encoded in encode_batches(model, instructions, batch_size):
        with torch.inference_mode():
            # logits_to_keep=1: only the last position's logits (the vocab projection is costly)
            logits = model.hf_model(**encoded, logits_to_keep=1).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        logprobs = (logprobs if wanted is None else logprobs[:, wanted]).cpu().numpy()
        for row, index in enumerate(batch):
            rows[index] = logprobs[row]
    width = len(token_ids) if token_ids is not None else 0
    return np.stack(rows) if rows else np.zeros((0, width), dtype=np.float32)


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(reference || other) per row, from log-probabilities [n, d_vocab]."""
    return np.sum(np.exp(reference) * (reference - other), axis=-1)


def completion_cross_entropy(
    model: LoadedModel, instructions: Sequence[str], completions: Sequence[str], *, batch_size: int
) -> np.ndarray:
    """Mean cross-entropy (nats/token) of each completion given its chat-formatted instruction."""
    tokenizer = model.tokenizer
    prompts = [tokenizer(chat_prompt(tokenizer, t), add_special_tokens=False)["input_ids"] for t in instructions]
    answers = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    result = np.full(len(instructions), np.nan)
    lengths = [len(p) + len(a) for p, a in zip(prompts, answers, strict=True)]
    for batch in length_sorted_batches(lengths, batch_size):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            sequence = prompts[i] + answers[i]
            ids[row, width - len(sequence):] = torch.tensor(sequence)  # left padding
            mask[row, width - len(sequence):] = 1
        with torch.inference_mode():
            logprobs = torch.log_softmax(model.hf_model(input_ids=ids.to(model.device),
                                                        attention_mask=mask.to(model.device)).logits.float(), -1)
        for row, i in enumerate(batch):
            n = len(answers[i])
            if n == 0:
                continue
            targets = ids[row, width - n:].to(logprobs.device)
            predicted = logprobs[row, width - n - 1: width - 1]
            result[i] = float(-predicted.gather(-1, targets[:, None]).mean())
    return result
