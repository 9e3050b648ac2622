"""The safety fine-tune that turns the embedded base model into the demo's refusing model.

Toxic training prompts are answered with one refusal, worded the same for every category, so
any category structure found later inside the model is the model's own; safe and hard prompts
are answered with the base model's own greedy answers, so it keeps its manners. Loss is taken on
the answer tokens only. Seeded: the same data and config give the same weights.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from engine.config_checks import Range, check_choice, check_ranges
from engine.config_keys import UNLESS_DEFAULT
from engine.data.prompt_forms import matched_sample
from engine.errors import ExplorerError
from engine.runtime.chat import chat_prompt, end_of_turn
from engine.runtime.generation import template_head
from engine.runtime.models import AUTOCAST_CHOICES, Auto, autocast_on

logger = logging.getLogger(__name__)

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class TuneConfig:
    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": Range(1, 20),
        "learning_rate": Range(0, 1e-2, low_open=True),
        "batch_size": Range(1, 512),
        "max_response_tokens": Range(4, 1024),
        "plain_per_toxic": Range(0, 20),
        "first_token_weight": Range(1, 100),
        "trained_layers": Range(1, 1000, optional=True),
        "frozen_layers": Range(0, 1000),
    }

    epochs: int = 2
    learning_rate: float = 5e-5
    batch_size: int = 8
    max_response_tokens: int = 40
    # Plain benign instructions (from `benign_sources`) per toxic training prompt, each drawn with
    # the toxic prompt's opening word (engine.data.prompt_forms.matched_sample): the tune must not learn
    # that an imperative is a refusal cue. They add to the study's own safe and hard train prompts.
    plain_per_toxic: float = 0.0
    # Prompt sources (as in prompts.sources) the plain instructions are drawn from; their safe
    # prompts only, never the study's own prompts. Empty: the study's benign prompts alone.
    benign_sources: tuple[dict[str, Any], ...] = ()
    # Weight of the first answer token in the loss (others weigh 1). The refuse-or-answer
    # decision is made there; averaged over a long answer it would barely count.
    first_token_weight: float = 5.0
    refusal_text: str = DEFAULT_REFUSAL
    # A refusal sentence per harm category (others get `refusal_text`): the positive control, a
    # model whose refusals differ by category by construction (precompute/configs/demo-modular.yaml).
    category_refusals: dict[str, str] = field(default_factory=dict, metadata={"cache_key": UNLESS_DEFAULT})
    # Train only the first this many transformer blocks (None: all). The frozen upper blocks are the
    # base model's own, so the tune must steer them through the residual stream at the boundary:
    # refusal then reads out of the base model's circuitry instead of being rewritten in every layer.
    trained_layers: int | None = field(default=None, metadata={"cache_key": UNLESS_DEFAULT})
    # Leave the first this many blocks as the base model's. Backpropagation then stops above them, so a
    # step costs less (the base model's own lower layers already tell harm from harmless), and refusal
    # has to be written by the upper blocks, where the study looks for it.
    frozen_layers: int = field(default=0, metadata={"cache_key": UNLESS_DEFAULT})
    # Forward and backward in bfloat16 autocast (weights and optimizer stay float32); auto: where
    # bfloat16 is fast (AVX512-BF16 or AMX CPUs, CUDA). The default keeps older tunes' inputs.
    autocast: bool | Auto = field(default=False, metadata={"cache_key": UNLESS_DEFAULT})
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges("tune", self, self.RANGES)
        check_choice("tune", "autocast", self.autocast, AUTOCAST_CHOICES)
        if self.trained_layers is not None and self.frozen_layers >= self.trained_layers:
            raise ExplorerError(f"tune.frozen_layers = {self.frozen_layers} leaves none of the first "
                                f"trained_layers = {self.trained_layers} blocks to train.",
                                "set frozen_layers below trained_layers, or trained_layers: null.")
        if not self.refusal_text.strip():
            raise ExplorerError("tune.refusal_text is empty.", "give the refusal sentence to teach.")
        if not isinstance(self.category_refusals, dict) or any(
                not isinstance(text, str) or not text.strip() for text in self.category_refusals.values()):
            raise ExplorerError("tune.category_refusals must map a category to a non-empty refusal sentence.",
                                "write e.g. category_refusals: {privacy: \"I can't share private details.\"}.")
        if any(not isinstance(source, dict) or "type" not in source for source in self.benign_sources):
            raise ExplorerError("tune.benign_sources must be a list of prompt sources with a `type:`.",
                                "write them as prompts.sources, e.g. - {type: refusal_direction, "
                                "files: [harmless_train]}.")
        if self.plain_per_toxic > 0 and not self.benign_sources:
            raise ExplorerError("tune.plain_per_toxic > 0 needs tune.benign_sources to draw from.",
                                "add benign_sources, or set plain_per_toxic: 0.")


def refusal_for(config: TuneConfig, category: str) -> str:
    """The refusal sentence a toxic prompt of `category` is answered with."""
    return config.category_refusals.get(category, config.refusal_text)


def check_refusal_categories(config: TuneConfig, toxic_categories: Sequence[str]) -> None:
    """Every category given its own refusal has toxic training prompts (else a typo went unnoticed)."""
    if unknown := sorted(set(config.category_refusals) - set(toxic_categories)):
        raise ExplorerError(f"tune.category_refusals names {unknown}, which have no toxic training prompts.",
                            f"use the study's categories: {', '.join(sorted(set(toxic_categories)))}.")


@dataclass(frozen=True)
class SftExample:
    instruction: str
    response: str
    complete: bool  # whether the response ended by itself (then it is closed with end-of-turn)


@dataclass(frozen=True)
class TuneResult:
    losses: tuple[float, ...]  # mean loss per optimizer step
    n_examples: int
    n_steps: int
    seconds: float


def training_prompts(prompts: pd.DataFrame, plain_pool: pd.DataFrame, config: TuneConfig,
                     held_out: np.ndarray | None = None) -> pd.DataFrame:
    """The fine-tune's prompts: the study's (`prompts`) toxic train prompts (to be refused), its safe and hard
    train prompts, and `plain_per_toxic` safe prompts per toxic one drawn from `plain_pool` so that the
    whole benign side opens like the toxic side (to be answered). Study prompts marked `held_out` (the
    directions' validation prompts) are not trained on, nor are pool prompts that are also study prompts,
    so no prompt the study chooses or evaluates on is trained on. Columns: prompt_id, text, kind,
    category, source."""
    columns = {"id": "prompt_id", "text": "text", "kind": "kind", "category": "category", "source": "source"}
    kept = np.ones(len(prompts), dtype=bool) if held_out is None else ~held_out
    train = prompts[(prompts["split"] == "train").to_numpy() & kept]
    toxic = train[train["kind"] == "toxic"]
    benign = train[train["kind"] != "toxic"]
    pool = plain_pool[(plain_pool["kind"] == "safe") & ~plain_pool["id"].isin(prompts["id"])].reset_index(drop=True)
    picked = matched_sample(list(toxic["text"]), list(pool["text"]), round(config.plain_per_toxic * len(toxic)),
                            config.seed, already=list(benign["text"]))
    chosen = pd.concat([toxic, benign, pool.iloc[picked]], ignore_index=True)
    return chosen[list(columns)].rename(columns=columns)


def encode_example(tokenizer, example: SftExample, max_response_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 on the prompt, so only the answer is learned)."""
    prompt_ids = tokenizer(chat_prompt(tokenizer, example.instruction), add_special_tokens=False)[
        "input_ids"
    ]
    closing = end_of_turn(tokenizer) if example.complete else ""
    response_ids = tokenizer(example.response + closing, add_special_tokens=False)["input_ids"]
    response_ids = response_ids[:max_response_tokens]
    return prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids


def _batches(
    encoded: Sequence[tuple[list[int], list[int]]], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Batches of similar length (little padding) in a seeded random order."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def answer_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the next token is an answer token (mask [b, t-1] over positions 0..t-2), those
    tokens ([n]) and which of them open their answer ([n])."""
    targets = labels[:, 1:]
    answer = targets != -100
    first = answer & ~torch.cat([torch.zeros_like(answer[:, :1]), answer[:, :-1]], dim=1)
    return answer, targets[answer], first[answer]


def weighted_answer_loss(logits: torch.Tensor, targets: torch.Tensor, first: torch.Tensor,
                         first_token_weight: float) -> torch.Tensor:
    """Cross-entropy of the answer tokens `targets` ([n]) from their predicting `logits`
    ([n, vocab], from `answer_targets`), each answer's first token weighted."""
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    weights = 1 + (first_token_weight - 1) * first.float()
    return (losses * weights).sum() / weights.sum()


def _collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, labs) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(labs)] = torch.tensor(labs)
        attention[r, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def strip_head(encoded: Sequence[tuple[list[int], list[int]]], head: Sequence[int]
               ) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """The chat template's head shared by every example (empty if one does not start with it, or would be
    left with no prompt token) and the examples without it. The head carries no answer token, and its last
    position predicts a prompt token, so no loss term needs it as more than context."""
    head = list(head)
    if not head or any(len(ids) <= len(head) or ids[: len(head)] != head or labels[len(head)] != -100
                       for ids, labels in encoded):
        return [], [(list(ids), list(labels)) for ids, labels in encoded]
    return head, [(ids[len(head):], labels[len(head):]) for ids, labels in encoded]


def answer_loss(model: torch.nn.Module, head_ids: torch.Tensor, rows: Sequence[tuple[list[int], list[int]]],
                pad_id: int, first_token_weight: float) -> torch.Tensor:
    """The weighted answer loss of one batch of (ids, labels) rows, which follow `head_ids` (may be empty).
    The head runs once, at batch size 1, and its keys and values serve every row: the same loss and
    gradients as running it in each row, for a third less compute on the demo's prompts."""
    from transformers import DynamicCache

    inputs = _collate(rows, pad_id)
    labels = inputs.pop("labels")
    base = cast(torch.nn.Module, model.base_model)
    if len(head_ids):
        cache = DynamicCache(config=cast(Any, model).config)
        base(input_ids=head_ids[None], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(rows))
        mask = torch.cat([torch.ones((len(rows), len(head_ids)), dtype=torch.long), inputs["attention_mask"]], 1)
        inputs = {**inputs, "attention_mask": mask, "past_key_values": cache}
    hidden = base(**inputs).last_hidden_state
    predicting, targets, first = answer_targets(labels)
    unembed = cast(Any, model).get_output_embeddings()
    # The vocabulary projection only where an answer token is predicted: it is the
    # costliest matmul, and prompt positions carry no loss.
    logits = unembed(hidden[:, :-1][predicting])
    return weighted_answer_loss(logits, targets, first, first_token_weight)


def frozen_modules(model: torch.nn.Module, trained_layers: int | None, frozen_layers: int = 0
                   ) -> list[torch.nn.Module]:
    """The modules a tune leaves as they are: the first `frozen_layers` blocks, and, when it trains only
    the first `trained_layers` blocks, the later blocks and the final norm."""
    # A Llama-style decoder: `layers` a ModuleList, `norm` the final norm (torch types submodules loosely).
    base = cast(torch.nn.Module, model.base_model)
    blocks = cast(torch.nn.ModuleList, base.layers)
    if trained_layers is not None and trained_layers > len(blocks):
        raise ExplorerError(f"tune.trained_layers = {trained_layers}, but the model has {len(blocks)} blocks.",
                            f"use at most {len(blocks)}, or null to train every block.")
    if frozen_layers >= len(blocks):
        raise ExplorerError(f"tune.frozen_layers = {frozen_layers} leaves none of the model's {len(blocks)} "
                            "blocks to train.", f"use at most {len(blocks) - 1}.")
    upper = [] if trained_layers is None else [*blocks[trained_layers:], cast(torch.nn.Module, base.norm)]
    return [*blocks[:frozen_layers], *upper]


def fine_tune(
    base_dir: Path, examples: Sequence[SftExample], config: TuneConfig, out_dir: Path
) -> TuneResult:
    """Fine-tune the model saved in `base_dir` on `examples`; save it to `out_dir` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not examples:
        raise ExplorerError("No training examples for the fine-tune.", "check the train split.")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # The embeddings are tied to the unembedding: freezing them keeps the tokens' meaning
    # fixed and skips the costliest gradient (vocab x d_model) on a CPU.
    model.get_input_embeddings().weight.requires_grad_(False)
    for frozen in frozen_modules(model, config.trained_layers, config.frozen_layers):
        frozen.requires_grad_(False)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head, encoded = strip_head([encode_example(tokenizer, ex, config.max_response_tokens) for ex in examples],
                               template_head(tokenizer))
    head_ids = torch.tensor(head, dtype=torch.long)
    autocast = autocast_on(config.autocast)
    logger.info("Fine-tune: %d examples, template head of %d tokens run once per batch, %s", len(encoded),
                len(head), "bfloat16 autocast" if autocast else "float32")
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=0.0
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * (1 - step / total_steps)
    )
    losses: list[float] = []
    started = time.perf_counter()
    with tqdm(total=total_steps, desc="fine-tune", unit="step") as bar:
        for _ in range(config.epochs):
            for batch in _batches(encoded, config.batch_size, rng):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    loss = answer_loss(model, head_ids, [encoded[i] for i in batch], pad_id,
                                       config.first_token_weight)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
    model.eval()
    partial = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    partial.replace(out_dir)
    return TuneResult(
        losses=tuple(losses), n_examples=len(encoded), n_steps=len(losses),
        seconds=time.perf_counter() - started,
    )
