"""Gradients of a refusal metric with respect to activations at hook sites.

Attribution patching (Nanda 2023; Marks et al. 2024) estimates the effect of moving an activation
from a baseline to its value as (value - baseline) . gradient. The gradient at a hook is taken
with respect to the hook's output, so a feature i of an SAE at that hook gets
(f_i - f_i_baseline) * (W_dec[i] . gradient) and the SAE's error term (x - x_hat) the rest,
without splicing the SAE into the forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.circuits.refusal_metric import RefusalMetric
from engine.errors import ExplorerError
from engine.runtime.generation import EncodedBatch, map_encoded
from engine.runtime.interventions import applied
from engine.runtime.models import LoadedModel


@dataclass(frozen=True)
class SiteGradients:
    """Per prompt: activations and metric gradients at (hook, offset) sites, and the metric."""

    activations: np.ndarray  # [n_prompts, n_hooks, n_offsets, d_model]
    gradients: np.ndarray  # same shape
    metric: np.ndarray  # [n_prompts]


def metric_gradients(
    model: LoadedModel,
    instructions: Sequence[str],
    hook_names: Sequence[str],
    offsets: Sequence[int],
    metric: RefusalMetric,
    *,
    batch_size: int,
    interpolate: tuple[np.ndarray, float] | None = None,
    desc: str = "gradients",
) -> SiteGradients:
    """Gradients of each prompt's `metric` (at the first response position) with respect to the
    activations at `hook_names`, read at negative `offsets` from the prompt's end.

    `interpolate=(baseline, alpha)` first moves the activations at those positions to
    baseline + alpha * (activation - baseline), baseline [n_hooks, n_offsets, ...] (one step of
    integrated gradients); the activations returned are still the un-moved ones."""
    missing = [name for name in hook_names if name not in model.bridge.hook_dict]
    if missing:
        raise ExplorerError(f"{model.name} has no hook(s) {missing}.",
                            "use TransformerLens hook names such as blocks.3.hook_resid_pre.")
    activations: np.ndarray | None = None
    gradients: np.ndarray | None = None
    scores = np.zeros(len(instructions))
    index = torch.tensor(list(offsets))
    sites: dict[str, torch.Tensor] = {}
    originals: dict[str, torch.Tensor] = {}

    def keep(h: int, name: str):
        def hook(activation: torch.Tensor, hook: object) -> torch.Tensor:
            originals[name] = activation[:, index].detach().float()
            if interpolate is not None:  # a new leaf: upstream hooks' gradients would pass through it
                activation = activation.detach().clone()
                baseline = torch.from_numpy(interpolate[0][h]).to(activation.device)
                moved = baseline + interpolate[1] * (originals[name] - baseline)
                activation[:, index] = moved.to(activation.dtype)
            if not activation.requires_grad:  # frozen weights: start the graph here
                activation = activation.detach().requires_grad_(True)
            sites[name] = activation
            return activation
        return hook

    def forward(batch: list[int], encoded: EncodedBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sites.clear()
        score = metric(model.hf_model(**encoded.forward_inputs(), logits_to_keep=1).logits[:, -1, :])
        # Each prompt's score depends on its own row only, so the sum's gradient is per prompt.
        grads = torch.autograd.grad(score.sum(), [sites[name] for name in hook_names])
        return (torch.stack([originals[n] for n in hook_names], 1).cpu().numpy(),
                torch.stack([g[:, index] for g in grads], 1).float().cpu().numpy(),
                score.detach().cpu().numpy())

    with tqdm(total=len(instructions), desc=desc, unit="prompt", leave=False) as bar, \
            applied(model, [(name, keep(h, name)) for h, name in enumerate(hook_names)]), torch.enable_grad():
        for batch, (values, site_gradients, score) in map_encoded(model, instructions, batch_size, forward,
                                                                  desc=desc, keep_last=-min(offsets)):
            if activations is None or gradients is None:  # both set together, on the first batch
                activations = np.zeros((len(instructions), *values.shape[1:]), np.float32)
                gradients = np.zeros_like(activations)
            activations[batch] = values
            gradients[batch] = site_gradients
            scores[batch] = score
            bar.update(len(batch))
    if activations is None or gradients is None:
        raise ExplorerError("No prompts to take gradients on.", "pass at least one instruction.")
    return SiteGradients(activations, gradients, scores)


def integrated_gradients(
    model: LoadedModel,
    instructions: Sequence[str],
    hook_names: Sequence[str],
    offsets: Sequence[int],
    metric: RefusalMetric,
    baseline: np.ndarray,
    *,
    steps: int,
    batch_size: int,
) -> SiteGradients:
    """Integrated gradients from `baseline` [n_hooks, n_offsets, ...] to each prompt's activations:
    the gradient averaged at `steps` midpoints of the straight path, one hook at a time with the
    others left clean (Marks et al. 2024, appendix). The metric returned is the clean one."""
    if steps < 1:
        raise ExplorerError(f"Integrated gradients need at least one step, got {steps}.", "set steps >= 1.")
    clean = metric_gradients(model, instructions, hook_names, offsets, metric, batch_size=batch_size,
                             desc="gradients (clean)")
    averaged = np.zeros_like(clean.gradients)
    for h, name in enumerate(hook_names):
        for step in range(steps):
            alpha = (step + 0.5) / steps
            moved = metric_gradients(model, instructions, [name], offsets, metric, batch_size=batch_size,
                                     interpolate=(baseline[h : h + 1], alpha), desc=f"IG {name} {alpha:.2f}")
            averaged[:, h] += moved.gradients[:, 0] / steps
    return SiteGradients(clean.activations, averaged, clean.metric)
