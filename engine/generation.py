"""Batched greedy generation.

Prompts are sorted by length before batching (less padding) and left-padded, so the last
position of every row is the first response position. Generation runs Hugging Face `generate`
on the bridge's wrapped model: bridge hooks fire inside it, so interventions apply here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pandas as pd
import torch
from tqdm.auto import tqdm

from engine.batching import backed_off
from engine.chat import chat_prompt
from engine.models import LoadedModel

R = TypeVar("R")


@dataclass(frozen=True)
class Generation:
    text: str
    first_token_id: int  # the first generated token: what the refusal score is read from
    n_new_tokens: int


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices longest first: neighbours have similar lengths (less padding in a batch), and the
    largest batch runs first (an out-of-memory shows at once)."""
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])


def map_encoded(
    model: LoadedModel,
    instructions: Sequence[str],
    batch_size: int,
    work: Callable[[list[int], dict[str, torch.Tensor]], R],
    *,
    desc: str,
) -> Iterator[tuple[list[int], R]]:
    """(indices, work(indices, encoded)) over length-sorted batches of the chat-formatted
    `instructions`, left-padded on the model's device; batches halve on out-of-memory
    (engine.batching)."""
    tokenizer = model.tokenizer
    texts = [chat_prompt(tokenizer, text) for text in instructions]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def encode_and_work(batch: list[int]) -> R:
        encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, padding_side="left",
                            add_special_tokens=False).to(model.device)
        return work(batch, dict(encoded))

    return backed_off(length_order(lengths), encode_and_work, batch_size=batch_size, desc=desc)


def map_right_padded(
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    pad_token_id: int,
    work: Callable[[list[int], torch.Tensor, torch.Tensor], R],
    *,
    desc: str,
) -> Iterator[tuple[list[int], R]]:
    """(indices, work(indices, input_ids, attention_mask)) over token-id sequences, length-sorted
    and right-padded (on the CPU), so a token's position in the batch is its position in its own
    sequence; batches halve on out-of-memory (engine.batching)."""
    lengths = [len(ids) for ids in sequences]

    def pad_and_work(batch: list[int]) -> R:
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(list(sequences[i]))
            mask[row, : lengths[i]] = 1
        return work(batch, ids, mask)

    return backed_off(length_order(lengths), pad_and_work, batch_size=batch_size, desc=desc)


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

    def complete(batch: list[int], encoded: dict[str, torch.Tensor]) -> list[Generation]:
        with torch.inference_mode():
            output = model.hf_model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=tokenizer.pad_token_id)
        generations = []
        for ids in output[:, encoded["input_ids"].shape[1] :].tolist():
            generations.append(Generation(
                text=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                first_token_id=int(ids[0]),
                n_new_tokens=sum(1 for t in ids if t != tokenizer.pad_token_id) or 1,
            ))
        return generations

    with tqdm(total=len(instructions), desc=desc, unit="prompt", leave=False) as bar:
        for batch, generations in map_encoded(model, instructions, batch_size, complete, desc=desc):
            for index, generation in zip(batch, generations, strict=True):
                results[index] = generation
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
