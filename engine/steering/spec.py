"""One steering spec composing direction ablation, activation addition and SAE feature clamping.

Clamping keeps the SAE's error term: at the SAE's hook, x becomes x + sum_i (f'_i - f_i) W_dec[i],
which is decode(f') + (x - decode(f)); features not clamped, and whatever the SAE fails to
reconstruct, are left exactly as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sae_lens import SAE
from transformers.generation.streamers import BaseStreamer

from engine.errors import ExplorerError
from engine.judging.judge import refusal_log_odds
from engine.runtime.chat import chat_prompt
from engine.runtime.interventions import Hook, ablation_hooks, addition_hooks, applied, every_position
from engine.runtime.models import LoadedModel
from engine.saes.features import check_feature
from engine.saes.training import check_sae_fits
from engine.steering.limits import DEFAULT_LIMITS, SteeringLimits


@dataclass(frozen=True)
class Addition:
    direction: np.ndarray  # [d_model]
    layer: int
    alpha: float | None = None  # None: the direction's own norm


@dataclass(frozen=True)
class FeatureClamp:
    """Set chosen features to `value`, or multiply them by `scale` (exactly one of the two)."""

    sae: SAE
    features: tuple[int, ...]
    value: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.scale is None):
            raise ExplorerError("A feature clamp needs exactly one of value and scale.",
                                "e.g. value=8.0 to set the features, or scale=0.0 to switch them off.")
        for feature in self.features:
            check_feature(self.sae, feature)


@dataclass(frozen=True)
class Steering:
    ablate: tuple[np.ndarray, ...] = ()  # directions projected out everywhere
    add: tuple[Addition, ...] = ()
    clamp: tuple[FeatureClamp, ...] = ()

    def hooks(self, model: LoadedModel) -> list[Hook]:
        """Additions first, then ablations: at a site with both, an ablated direction is absent afterwards,
        including any part of it an addition brought in."""
        hooks: list[Hook] = []
        for addition in self.add:
            hooks += addition_hooks(model, torch.from_numpy(np.asarray(addition.direction, np.float32)),
                                    addition.layer, addition.alpha)
        if self.ablate:
            hooks += ablation_hooks(model, torch.from_numpy(np.stack(self.ablate).astype(np.float32)))
        hooks += [clamp_hook(model, clamp) for clamp in self.clamp]
        return hooks


def clamp_hook(model: LoadedModel, clamp: FeatureClamp) -> Hook:
    hook_name = check_sae_fits(clamp.sae, model)
    index = torch.tensor(list(clamp.features), dtype=torch.long)
    decoder = clamp.sae.W_dec.detach().float()[index]  # [n_features, d_model], on the SAE's device

    @every_position
    def steer(activation: torch.Tensor, hook: object) -> torch.Tensor:
        with torch.no_grad():
            codes = clamp.sae.encode(activation.float().to(decoder.device))[..., index]
            if clamp.value is not None:
                target = torch.full_like(codes, clamp.value)
            else:
                assert clamp.scale is not None, "a clamp has exactly one of value and scale"
                target = codes * clamp.scale
            return activation + ((target - codes) @ decoder).to(activation.device, activation.dtype)

    return hook_name, steer



@dataclass(frozen=True)
class SteeredAnswer:
    text: str
    refusal_score: float  # at the first response position, under the steering
    top_tokens: list[tuple[str, float]]  # the most likely first tokens and their probabilities


class _RowStreamer(BaseStreamer):
    """Hands each row's text so far to `on_text(row, text)` after every generated token."""

    def __init__(self, tokenizer, n_rows: int, on_text: Callable[[int, str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.rows: list[list[int]] = [[] for _ in range(n_rows)]
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.rows), -1)[:, -1].tolist()):
            self.rows[row].append(token)
            self.on_text(row, self.tokenizer.decode(self.rows[row], skip_special_tokens=True))

    def end(self) -> None:
        pass


def _rows_only(hook: Hook, rows: torch.Tensor) -> Hook:
    """The hook applied to the batch rows where `rows` is True; the others pass unchanged."""
    name, function = hook

    def masked(activation: torch.Tensor, hook: object) -> torch.Tensor:
        changed = function(activation, hook)
        return torch.where(rows.to(activation.device).view(-1, *([1] * (activation.dim() - 1))), changed, activation)

    return name, masked


def compare_answers(model: LoadedModel, instruction: str, steering: Steering, refusal_token_ids: Sequence[int], *,
                    max_new_tokens: int, min_new_tokens: int = 0, top_k: int = 8,
                    on_text: Callable[[int, str], None] | None = None,
                    limits: SteeringLimits = DEFAULT_LIMITS) -> tuple[SteeredAnswer, SteeredAnswer]:
    """Greedy (baseline, steered) answers to one prompt, generated together as a batch of two in
    which only the second row is steered; `on_text(row, text)` streams them token by token
    (`min_new_tokens` keeps both going past an early end of turn, for benchmarks)."""
    limits.check(instruction, max_new_tokens, steering)
    tokenizer = model.tokenizer
    encoded = tokenizer([chat_prompt(tokenizer, instruction)] * 2, return_tensors="pt",
                        add_special_tokens=False).to(model.device)
    steered_row = torch.tensor([False, True])
    hooks = [_rows_only(hook, steered_row) for hook in steering.hooks(model)]
    streamer = _RowStreamer(tokenizer, 2, on_text) if on_text is not None else None
    with applied(model, hooks), torch.inference_mode():
        # The first step's logits come with the generation: no extra forward pass. (transformers types
        # generate's self as a Protocol that its models do not match under pyright.)
        output = model.hf_model.generate(  # pyright: ignore[reportAttributeAccessIssue]
            **encoded, max_new_tokens=max_new_tokens, min_new_tokens=min(min_new_tokens, max_new_tokens),
            do_sample=False, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
            return_dict_in_generate=True, output_logits=True)
    logprobs = torch.log_softmax(output.logits[0].float(), dim=-1)  # [2, vocab] at the first step
    ids = torch.tensor(list(refusal_token_ids), dtype=torch.long, device=logprobs.device)
    scores = refusal_log_odds(logprobs[:, ids])
    start = encoded["input_ids"].shape[1]

    def answer(row: int) -> SteeredAnswer:
        top = logprobs[row].topk(top_k)
        return SteeredAnswer(
            text=tokenizer.decode(output.sequences[row, start:], skip_special_tokens=True).strip(),
            refusal_score=float(scores[row]),
            top_tokens=[(tokenizer.decode([int(i)]), float(p)) for i, p in zip(top.indices, top.values.exp(),
                                                                                strict=True)])

    return answer(0), answer(1)
