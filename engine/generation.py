"""Batched greedy generation and first-response-position log-probabilities.

Prompts are sorted by length before batching (less padding) and left-padded, so the last
position of every row is the first response position. Generation runs Hugging Face `generate`
on the bridge's wrapped model: bridge hooks fire inside it, so interventions apply here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.chat import chat_prompt
from engine.models import LoadedModel


@dataclass(frozen=True)
class Generation:
    text: str
    first_token_id: int  # the first generated token: what the refusal score is read from
    n_new_tokens: int


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, to fail fast on memory)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _encode_batches(
    model: LoadedModel, instructions: Sequence[str], batch_size: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    tokenizer = model.tokenizer
    texts = [chat_prompt(tokenizer, text) for text in instructions]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    for batch in length_sorted_batches(lengths, batch_size):
        encoded = tokenizer(
            [texts[i] for i in batch],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        ).to(model.device)
        yield batch, dict(encoded)


def generate(
    model: LoadedModel,
    instructions: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generate",
) -> list[Generation]:
    """Greedy completions for instructions, returned in input order."""
    results: list[Generation | None] = [None] * len(instructions)
    tokenizer = model.tokenizer
    with tqdm(total=len(instructions), desc=desc, unit="prompt", leave=False) as bar:
        for batch, encoded in _encode_batches(model, instructions, batch_size):
            with torch.inference_mode():
                output = model.hf_model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            for row, index in enumerate(batch):
                ids = new_tokens[row].tolist()
                n_new = sum(1 for t in ids if t != tokenizer.pad_token_id) or 1
                results[index] = Generation(
                    text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                    first_token_id=int(ids[0]),
                    n_new_tokens=n_new,
                )
            bar.update(len(batch))
    return [r for r in results if r is not None]


def first_position_logprobs(
    model: LoadedModel,
    instructions: Sequence[str],
    token_ids: Sequence[int],
    *,
    batch_size: int,
) -> np.ndarray:
    """Log-probabilities of `token_ids` as the first response token: [n_prompts, len(token_ids)]."""
    rows: list[np.ndarray | None] = [None] * len(instructions)
    wanted = torch.tensor(list(token_ids), dtype=torch.long, device=model.device)
    for batch, encoded in _encode_batches(model, instructions, batch_size):
        with torch.inference_mode():
            logits = model.hf_model(**encoded).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)[:, wanted].cpu().numpy()
        for row, index in enumerate(batch):
            rows[index] = logprobs[row]
    if not rows:
        return np.zeros((0, len(token_ids)), dtype=np.float32)
    return np.stack(rows)
