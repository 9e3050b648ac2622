"""Capture residual-stream activations at the last prompt positions, batched, in bounded memory.

Positions are counted from the end of the chat-formatted prompt: the template's tokens after
the instruction ("post-instruction" tokens, e.g. `<|im_end|>\\n<|im_start|>assistant\\n`) plus
the last instruction token. Prompts are left-padded, so these positions line up across a batch.
Only those positions are copied out of each hook, never the whole sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.chat import chat_prompt
from engine.generation import encode_batches
from engine.interventions import applied
from engine.models import LoadedModel

PROBE_INSTRUCTION = "PROBE"


def post_instruction_tokens(tokenizer) -> list[str]:
    """The template tokens that follow the instruction, as strings (what the positions mean)."""
    text = chat_prompt(tokenizer, PROBE_INSTRUCTION)
    tail = text.split(PROBE_INSTRUCTION, 1)[1]
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode([i]) for i in ids]


@dataclass(frozen=True)
class PositionSet:
    offsets: tuple[int, ...]  # negative offsets from the end of the prompt, e.g. (-6, ..., -1)
    labels: tuple[str, ...]   # what token sits there ("<last instruction token>", "<|im_end|>", ...)


def prompt_end_positions(tokenizer) -> PositionSet:
    """The last instruction token and every post-instruction token."""
    post = post_instruction_tokens(tokenizer)
    n = len(post) + 1
    return PositionSet(offsets=tuple(range(-n, 0)), labels=("<instruction end>", *post))


def capture(
    model: LoadedModel,
    instructions: Sequence[str],
    hook_names: Sequence[str],
    offsets: Sequence[int],
    *,
    batch_size: int,
    desc: str = "capture",
) -> np.ndarray:
    """Activations [n_prompts, n_hooks, n_offsets, d_model] (float32) in input order."""
    out = np.zeros((len(instructions), len(hook_names), len(offsets), model.d_model), dtype=np.float32)
    index = torch.tensor(list(offsets))
    current: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(activation: torch.Tensor, hook: object) -> torch.Tensor:
            current[name] = activation[:, index, :].detach().float().cpu()
            return activation
        return hook

    hooks = [(name, keep(name)) for name in hook_names]
    with tqdm(total=len(instructions), desc=desc, unit="prompt", leave=False) as bar, applied(model, hooks):
        for batch, encoded in encode_batches(model, instructions, batch_size):
            current.clear()
            with torch.inference_mode():
                model.hf_model.base_model(**encoded)  # the transformer body: no logits needed
            out[batch] = torch.stack([current[name] for name in hook_names], dim=1).numpy()
            bar.update(len(batch))
    return out
