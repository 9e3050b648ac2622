"""Capture residual-stream activations at the last prompt positions, batched, in bounded memory.

Positions are counted from the end of the chat-formatted prompt: the template's tokens after
the instruction ("post-instruction" tokens, e.g. `<|im_end|>\\n<|im_start|>assistant\\n`) plus
the last instruction token. Prompts are left-padded, so these positions line up across a batch.
Only those positions are copied out of each hook, never the whole sequence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, overload

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from engine.errors import ExplorerError
from engine.runtime.chat import chat_prompt
from engine.runtime.generation import EncodedBatch, map_encoded, map_right_padded, template_head
from engine.runtime.interventions import applied
from engine.runtime.models import LoadedModel

PROBE_INSTRUCTION = "PROBE"


def post_instruction_tokens(tokenizer) -> list[str]:
    """The template tokens that follow the instruction, as strings (what the positions mean)."""
    text = chat_prompt(tokenizer, PROBE_INSTRUCTION)
    tail = text.split(PROBE_INSTRUCTION, 1)[1]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    # Whitespace tokens are shown escaped ("\\n"), so labels stay readable in tables and charts.
    escapes = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})
    return [tokenizer.decode([i]).translate(escapes) for i in ids]


class ActivationSink(Protocol):
    """Where `capture` puts each batch: `sink[rows] = values` ([len(rows), ...] of a [n, ...] whole)."""

    shape: tuple[int, ...]

    def __setitem__(self, rows: list[int], values: np.ndarray) -> None: ...


class _Captured(Exception):
    """Raised once every wanted hook has fired: the layers above them need not run."""


def stop_when_complete(current: dict[str, torch.Tensor], hook_names: Sequence[str]) -> None:
    if len(current) == len(set(hook_names)):
        raise _Captured


def body_until_captured(model: LoadedModel, inputs: dict[str, torch.Tensor], *, grad: bool = False) -> None:
    """Run the transformer body (no unembedding) until the capture hooks have all fired; `grad`
    keeps the autograd graph (the caller enables it)."""
    try:
        with contextlib.nullcontext() if grad else torch.inference_mode():
            model.hf_model.base_model(**inputs)
    except _Captured:
        pass


@dataclass(frozen=True)
class PositionSet:
    offsets: tuple[int, ...]  # negative offsets from the end of the prompt, e.g. (-6, ..., -1)
    labels: tuple[str, ...]   # what token sits there ("<last instruction token>", "<|im_end|>", ...)


def prompt_end_positions(tokenizer) -> PositionSet:
    """The last instruction token and every post-instruction token."""
    post = post_instruction_tokens(tokenizer)
    n = len(post) + 1
    return PositionSet(offsets=tuple(range(-n, 0)), labels=("<instruction end>", *post))


Out = TypeVar("Out", bound="np.ndarray | ActivationSink")


@overload
def capture(model: LoadedModel, instructions: Sequence[str], hook_names: Sequence[str], offsets: Sequence[int],
            *, batch_size: int, desc: str = ..., out: None = None
            ) -> Float[np.ndarray, "n_prompts n_hooks n_offsets ..."]: ...


@overload
def capture(model: LoadedModel, instructions: Sequence[str], hook_names: Sequence[str], offsets: Sequence[int],
            *, batch_size: int, desc: str = ..., out: Out) -> Out: ...


def capture(
    model: LoadedModel,
    instructions: Sequence[str],
    hook_names: Sequence[str],
    offsets: Sequence[int],
    *,
    batch_size: int,
    desc: str = "capture",
    out: np.ndarray | ActivationSink | None = None,
) -> np.ndarray | ActivationSink:
    """Activations [n_prompts, n_hooks, n_offsets, d_model] (float32) in input order (any
    per-position shape in place of d_model for hooks such as attn.hook_z, the same at every hook).

    Pass `out` to stream them batch by batch instead of holding them in memory: to disk (e.g.
    `np.lib.format.open_memmap(...)`) or into running sums (engine.directions.extraction.GroupSums); it is
    returned."""
    if any(offset >= 0 for offset in offsets):
        raise ExplorerError(f"Positions {list(offsets)} must be negative offsets from the prompt's end.",
                            "use e.g. -1 for the last prompt token (see prompt_end_positions).")
    shape = (len(instructions), len(hook_names), len(offsets), model.d_model)
    if out is not None and out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    index = torch.tensor(list(offsets))
    current: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(activation: torch.Tensor, hook: object) -> torch.Tensor:
            current[name] = activation[:, index, :].detach().float().cpu()
            stop_when_complete(current, hook_names)
            return activation
        return hook

    def forward(batch: list[int], encoded: EncodedBatch) -> np.ndarray:
        shortest = int(encoded.attention_mask.sum(dim=1).min())
        if -min(offsets) > shortest:
            raise ExplorerError(f"Position {min(offsets)} lies before the start of a {shortest}-token prompt.",
                                f"use offsets between -{shortest} and -1.")
        current.clear()
        body_until_captured(model, encoded.forward_inputs())
        return torch.stack([current[name] for name in hook_names], dim=1).numpy()

    hooks = [(name, keep(name)) for name in hook_names]
    with tqdm(total=len(instructions), desc=desc, unit="prompt", leave=False) as bar, applied(model, hooks):
        for batch, stacked in map_encoded(model, instructions, batch_size, forward, desc=desc,
                                          keep_last=-min(offsets)):
            if out is None:  # sized by the hook, e.g. [n_offsets, n_heads, d_head] for attn.hook_z
                out = np.zeros((len(instructions), *stacked.shape[1:]), dtype=np.float32)
            out[batch] = stacked
            bar.update(len(batch))
    return np.zeros(shape, dtype=np.float32) if out is None else out


@dataclass(frozen=True)
class TokenActivations:
    """Activations at every kept token of many texts, flattened: row i is one token."""

    values: np.ndarray  # [n_tokens, n_hooks, d_model], in memory or memory-mapped (capture_tokens' spill)
    text_index: np.ndarray  # [n_tokens] which text the token belongs to
    position: np.ndarray  # [n_tokens] its position in that text's token sequence
    token_id: np.ndarray  # [n_tokens]


@dataclass(frozen=True)
class SaeTokens:
    """Which tokens of a text an SAE reads, in training, statistics and live encoding alike."""

    skip_token_ids: tuple[int, ...]
    skip_first: int


def sae_tokens(tokenizer: object, *, chat: bool = True) -> SaeTokens:
    """Not the special tokens; for chat text not the template's head (the same tokens, so the same
    activations, in every transcript), else not the first token."""
    return SaeTokens(tuple(tokenizer.all_special_ids), len(template_head(tokenizer)) if chat else 1)  # type: ignore[attr-defined]


def kept_token_mask(ids: torch.Tensor, mask: torch.Tensor, skip_token_ids: Sequence[int], *,
                    skip_first: int = 1) -> torch.Tensor:
    """The token positions an SAE reads: real tokens except the first `skip_first` (at least the
    first; the chat template's head, identical in every transcript, for a chat corpus) and
    `skip_token_ids`."""
    skip = torch.tensor(sorted(set(skip_token_ids)), dtype=torch.long)
    kept = mask.bool() & ~torch.isin(ids, skip)
    kept[:, : max(1, skip_first)] = False
    return kept


def spilled_rows(path: Path, n_rows: int, row_shape: Sequence[int]) -> np.ndarray:
    """[n_rows, *row_shape] float32 rows written one after another to `path`, memory-mapped read-only."""
    if not n_rows:  # nothing written: an empty file cannot be mapped
        return np.zeros((0, *row_shape), dtype=np.float32)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n_rows, *row_shape))


def capture_tokens(
    model: LoadedModel,
    sequences: Sequence[Sequence[int]],
    hook_names: Sequence[str],
    *,
    batch_size: int,
    skip_token_ids: Sequence[int] = (),
    skip_first: int = 1,
    desc: str = "capture tokens",
    spill: Path | None = None,
) -> TokenActivations:
    """Activations at every token of token-id `sequences`, except padding, the first `skip_first`
    tokens and `skip_token_ids` (template and special tokens carry outsized activations that would
    dominate an SAE's loss and its variance-explained; a template head repeated in every transcript
    would fill the corpus with copies of the same activations).

    With `spill`, the values are appended to that file batch by batch and come back memory-mapped
    (read-only): a corpus of any size needs memory for one batch only. The caller removes it."""
    tokenizer = model.tokenizer
    encoded_texts = [list(ids) for ids in sequences]
    values: list[np.ndarray] = []  # in memory, without `spill`
    indices: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    current: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(activation: torch.Tensor, hook: object) -> torch.Tensor:
            current[name] = activation.detach().float().cpu()
            stop_when_complete(current, hook_names)
            return activation
        return hook

    def forward(batch: list[int], ids: torch.Tensor,
                mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        current.clear()
        body_until_captured(model, {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)})
        rows, cols = kept_token_mask(ids, mask, skip_token_ids, skip_first=skip_first).nonzero(as_tuple=True)
        stacked = torch.stack([current[name][rows, cols] for name in hook_names], dim=1)
        return stacked.numpy(), np.asarray(batch)[rows.numpy()], cols.numpy(), ids[rows, cols].numpy()

    with tqdm(total=len(encoded_texts), desc=desc, unit="text", leave=False) as bar, \
            applied(model, [(name, keep(name)) for name in hook_names]), \
            contextlib.nullcontext() if spill is None else open(spill, "wb") as sink:
        batches = map_right_padded(encoded_texts, batch_size, tokenizer.pad_token_id, forward, desc=desc)
        for batch, (stacked, row_texts, row_positions, row_tokens) in batches:
            if sink is None:
                values.append(stacked)
            else:
                sink.write(stacked.tobytes())  # float32, C order
            indices.append((row_texts, row_positions, row_tokens))
            row_shape = stacked.shape[1:]  # [n_hooks, d_model]
            bar.update(len(batch))
    text_index, position, token_id = (np.concatenate(column) for column in zip(*indices, strict=True))
    stored = np.concatenate(values) if spill is None else spilled_rows(spill, len(text_index), row_shape)
    return TokenActivations(
        values=stored,
        text_index=text_index,
        position=position,
        token_id=token_id,
    )
