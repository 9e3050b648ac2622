"""Batched forward passes and greedy generation over chat prompts.

Prompts are sorted by length before batching (less padding) and left-padded, so the last
position of every row is the first response position. Generation runs Hugging Face `generate`
on the bridge's wrapped model when hooks are attached (they fire inside it), else on its hook-free twin
(engine.runtime.models.plain_twin: the same weights; `bench --only generation` measures the gain, 1.16x here).

The chat template's head (system prompt and user-turn opener: 24 of a demo prompt's 43 tokens)
is the same in every prompt. It runs once per call, under the call's every-position hooks
(engine.runtime.interventions.head_pass), and its keys and values are reused by every batch: the padding
sits between the head and each instruction, masked, with positions counted as without it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from engine.runtime.batching import backed_off
from engine.runtime.chat import chat_prompt
from engine.runtime.interventions import head_pass
from engine.runtime.models import LoadedModel

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


def template_head(tokenizer: Any) -> list[int]:
    """The chat template's token ids before the instruction, the same for every instruction."""
    probes: list[list[int]] = [tokenizer(chat_prompt(tokenizer, probe), add_special_tokens=False)["input_ids"]
                               for probe in ("A", "Z")]
    return list(os.path.commonprefix(probes))


@dataclass(frozen=True)
class EncodedBatch:
    """Left-padded chat prompts, after the cached template head when there is one."""

    input_ids: torch.Tensor  # [batch, width]: the tokens this pass runs
    attention_mask: torch.Tensor  # [batch, head + width]
    head_ids: torch.Tensor  # [head], empty without a cached head
    head_cache: DynamicCache | None  # the head's keys and values at batch size 1

    def _cache(self) -> DynamicCache:
        assert self.head_cache is not None, "called only with a cached head"
        cache = copy.deepcopy(self.head_cache)  # a forward pass appends to it
        cache.batch_repeat_interleave(len(self.input_ids))
        return cache

    def forward_inputs(self) -> dict[str, Any]:
        """Keyword arguments of the model's forward (and its base model's)."""
        if self.head_cache is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        positions = (self.attention_mask.cumsum(1) - 1).clamp(min=0)[:, len(self.head_ids):]
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": positions,
                "past_key_values": self._cache()}

    def generate_inputs(self) -> dict[str, Any]:
        """Keyword arguments of `generate`, which takes the head's ids too and skips the cached ones."""
        if self.head_cache is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        head = self.head_ids.expand(len(self.input_ids), -1)
        return {"input_ids": torch.cat([head, self.input_ids], 1), "attention_mask": self.attention_mask,
                "past_key_values": self._cache()}


def _head_cache(model: LoadedModel, head_ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.hf_model.config)
    with head_pass(), torch.no_grad():  # not inference_mode: gradient passes reuse the cache
        model.hf_model.base_model(input_ids=head_ids[None], past_key_values=cache, use_cache=True)
    return cache


def map_encoded(
    model: LoadedModel,
    instructions: Sequence[str],
    batch_size: int,
    work: Callable[[list[int], EncodedBatch], R],
    *,
    desc: str,
    reuse_head: bool = True,
    keep_last: int = 1,
) -> Iterator[tuple[list[int], R]]:
    """(indices, work(indices, encoded)) over length-sorted batches of the chat-formatted
    `instructions`, on the model's device; batches halve on out-of-memory (engine.runtime.batching).

    With `reuse_head` (and more than one prompt) the template head runs once, when the first batch
    does (so under the hooks attached then), and each batch holds only the rest of its prompts, at
    least their last `keep_last` tokens. Gradients with respect to the prompts' own positions are
    unchanged (the head does not depend on them); work that needs the head's activations too
    passes `reuse_head=False`."""
    tokenizer = model.tokenizer
    ids = tokenizer([chat_prompt(tokenizer, text) for text in instructions], add_special_tokens=False)["input_ids"]
    head = template_head(tokenizer) if reuse_head and len(ids) > 1 else []
    if ids and (any(row[: len(head)] != head for row in ids) or len(head) > min(map(len, ids)) - keep_last):
        head = []  # an instruction that merges into the head's last token, or too short a prompt
    head_ids = torch.tensor(head, dtype=torch.long, device=model.device)
    cached: list[DynamicCache] = []

    def encode_and_work(batch: list[int]) -> R:
        if head and not cached:
            cached.append(_head_cache(model, head_ids))
        rests = [ids[i][len(head):] for i in batch]
        width = max(map(len, rests))
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), len(head) + width), dtype=torch.long)
        mask[:, : len(head)] = 1
        for row, rest in enumerate(rests):
            input_ids[row, width - len(rest):] = torch.tensor(rest, dtype=torch.long)
            mask[row, mask.shape[1] - len(rest):] = 1
        return work(batch, EncodedBatch(input_ids.to(model.device), mask.to(model.device), head_ids,
                                        cached[0] if head else None))

    return backed_off(length_order(list(map(len, ids))), encode_and_work, batch_size=batch_size, desc=desc)


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
    sequence; batches halve on out-of-memory (engine.runtime.batching)."""
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

    def complete(batch: list[int], encoded: EncodedBatch) -> list[Generation]:
        inputs = encoded.generate_inputs()
        with torch.inference_mode(), model.generating() as generator:
            # transformers types generate's self as a Protocol that its models do not match under pyright.
            output = generator.generate(  # pyright: ignore[reportAttributeAccessIssue]
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generations = []
        for ids in output[:, inputs["input_ids"].shape[1] :].tolist():
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
