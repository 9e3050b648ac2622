"""Interventions on the residual stream, as TransformerLens hooks attached only inside a context.

- Directional ablation (Arditi et al. 2024): project a direction out of the residual stream
  before every block and out of every attention and MLP output, so no layer can write it back.
- Activation addition: add `alpha` times the unit direction to the residual stream before one
  block, at every position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from jaxtyping import Float

from engine.errors import ExplorerError
from engine.runtime.models import LoadedModel

HookFunction = Callable[[torch.Tensor, object], torch.Tensor]
Hook = tuple[str, HookFunction]

# True while the chat template's shared head is run once for a whole call (engine.runtime.generation):
# only hooks marked `every_position` act there; the others (capture, position patches) wait for
# the prompts' own tokens.
_IN_HEAD_PASS: ContextVar[bool] = ContextVar("in_head_pass", default=False)


def every_position(function: HookFunction) -> HookFunction:
    """Mark a hook that acts on every position alike (ablation, addition, feature clamping): it
    also runs over the cached template head, which then equals the head under that intervention."""
    function.every_position = True  # type: ignore[attr-defined]
    return function


@contextmanager
def head_pass() -> Iterator[None]:
    """The block runs the template head: hooks not marked `every_position` pass it unchanged."""
    token = _IN_HEAD_PASS.set(True)
    try:
        yield
    finally:
        _IN_HEAD_PASS.reset(token)


def _outside_head_pass(function: HookFunction) -> HookFunction:
    if getattr(function, "every_position", False):
        return function

    def guarded(activation: torch.Tensor, hook: object) -> torch.Tensor:
        return activation if _IN_HEAD_PASS.get() else function(activation, hook)

    return guarded


def _unit(direction: torch.Tensor, d_model: int) -> torch.Tensor:
    if direction.shape != (d_model,):
        raise ExplorerError(f"A direction of shape {tuple(direction.shape)} does not fit this model.",
                            f"use a vector of size d_model = {d_model} (from the same model).")
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ExplorerError("The direction to ablate has zero or non-finite norm.",
                            "pick a direction computed from two different prompt groups.")
    return direction / norm


def ablation_hooks(model: LoadedModel, directions: Float[torch.Tensor, "*k d_model"], weight: float = 1.0
                   ) -> list[Hook]:
    """Hooks projecting the span of `directions` ([d_model] or [k, d_model]) out everywhere; a `weight`
    below 1 removes only that share of the projection (a point on the refusal / side-effect curve)."""
    rows = directions.float()[None] if directions.dim() == 1 else directions.float()
    stacked = torch.stack([_unit(row, model.d_model) for row in rows])
    basis = torch.linalg.qr(stacked.T).Q.to(model.device)  # orthonormal columns spanning them

    @every_position
    def project_out(activation: torch.Tensor, hook: object) -> torch.Tensor:
        b = basis.to(activation.dtype)
        return activation - weight * ((activation @ b) @ b.T)

    sites = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")
    return [(f"blocks.{layer}.{site}", project_out) for layer in range(model.n_layers) for site in sites]


def addition_hooks(
    model: LoadedModel, direction: Float[torch.Tensor, " d_model"], layer: int, alpha: float | None = None
) -> list[Hook]:
    """A hook adding `alpha` times the unit `direction` to the residual stream entering block `layer`.

    `alpha=None` uses the direction's own norm, i.e. adds the difference of means itself
    (Arditi et al.'s activation addition)."""
    if not 0 <= layer < model.n_layers:
        raise ExplorerError(f"Layer {layer} does not exist in {model.name} ({model.n_layers} layers).",
                            f"pick a layer in 0..{model.n_layers - 1}.")
    unit_direction = _unit(direction.float(), model.d_model)
    scale = float(direction.float().norm()) if alpha is None else alpha
    shift = (scale * unit_direction).to(model.device)

    @every_position
    def add(activation: torch.Tensor, hook: object) -> torch.Tensor:
        return activation + shift.to(activation.dtype)

    return [(f"blocks.{layer}.hook_resid_pre", add)]


@contextmanager
def applied(model: LoadedModel, hooks: Sequence[Hook]) -> Iterator[None]:
    """Attach hooks for the duration of the block; they are removed even if it raises.

    Holds the model's lock throughout: run un-hooked work on a shared model as `applied(model, [])`
    so that it cannot overlap another thread's hooks. Hooks not marked `every_position` do not
    act in a `head_pass`."""
    with model.lock, model.bridge.hooks(fwd_hooks=[(name, _outside_head_pass(function)) for name, function in hooks]):
        yield
