"""Batched greedy generation.

Prompts are sorted by length before batching (less padding) and left-padded, so the last
position of every row is the first response position. Generation runs Hugging Face `generate`
on the bridge's wrapped model: bridge hooks fire inside it, so interventions apply here too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pandas as pd
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


def encode_batches(
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


def right_padded_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, pad_token_id: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(indices, input_ids, attention_mask) for token-id sequences, length-sorted and right-padded,
    so a token's position in the batch is its position in its own sequence."""
    lengths = [len(ids) for ids in sequences]
    for batch in length_sorted_batches(lengths, batch_size):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(list(sequences[i]))
            mask[row, : lengths[i]] = 1
        yield batch, ids, mask


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
        for batch, encoded in encode_batches(model, instructions, batch_size):
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


def answer_table(
    model: LoadedModel, prompts: pd.DataFrame, *, max_new_tokens: int, batch_size: int, desc: str = "generate"
) -> pd.DataFrame:
    """Greedy answers to a prompt table's rows: prompt_id, response, first_token_id, n_new_tokens."""
    outputs = generate(model, list(prompts["text"]), max_new_tokens=max_new_tokens, batch_size=batch_size,
                       desc=desc)
    return pd.DataFrame({
        "prompt_id": prompts["id"].to_numpy(),
        "response": [o.text for o in outputs],
        "first_token_id": [o.first_token_id for o in outputs],
        "n_new_tokens": [o.n_new_tokens for o in outputs],
    })
