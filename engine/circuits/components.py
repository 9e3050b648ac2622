"""Which attention heads and MLPs carry the refusal decision: activation patching, toxic -> safe.

A site's output at the prompt-end positions of safe prompts is replaced by its mean over a group of
toxic prompts (one harm category) at the same positions; the site's effect is the share of the
toxic-safe metric gap that this alone moves, (m_patched - m_safe) / (m_toxic - m_safe). Every
layer's attention and MLP output and every head (`attn.hook_z`, one slice per head) is estimated by
attribution patching, (donor - activation) . grad, from one backward pass; the strongest sites are
then patched exactly (one forward pass each), which is what a CPU can afford.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.circuits.discovery import metric_values
from engine.circuits.refusal_metric import RefusalMetric
from engine.runtime.models import LoadedModel


def layer_sites(n_layers: int) -> list[str]:
    """Every layer's attention output and MLP output."""
    return [f"blocks.{layer}.{site}" for layer in range(n_layers) for site in ("hook_attn_out", "hook_mlp_out")]


def head_sites(n_layers: int) -> list[str]:
    return [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]


def patched_metric(model: LoadedModel, instructions: Sequence[str], hook_name: str, offsets: Sequence[int],
                   replacement: np.ndarray, metric: RefusalMetric, *, batch_size: int,
                   head: int | None = None) -> float:
    """Mean metric with `hook_name`'s output at `offsets` set to `replacement` [n_offsets, ...]
    (for attn.hook_z and a `head`, only that head's slice [n_offsets, d_head])."""
    index = torch.tensor(list(offsets))
    value = torch.from_numpy(np.asarray(replacement, dtype=np.float32))

    def patch(activation: torch.Tensor, hook: object) -> torch.Tensor:
        activation = activation.clone()
        if head is None:
            activation[:, index] = value.to(activation.dtype)
        else:
            activation[:, index, head] = value.to(activation.dtype)
        return activation

    return float(metric_values(model, instructions, metric, batch_size=batch_size,
                               hooks=[(hook_name, patch)]).mean())


def patching_attribution(activations: np.ndarray, gradients: np.ndarray, donor: np.ndarray,
                         sum_axes: tuple[int, ...]) -> np.ndarray:
    """Attribution-patching estimate of setting each site to `donor`: (donor - activation) . grad,
    summed over `sum_axes` (positions and features), averaged over prompts. activations and
    gradients [n, n_sites, ...] from `metric_gradients`; donor [n_sites, ...]. For attn.hook_z
    [n, n_layers, n_offsets, n_heads, d_head] with sum_axes (2, 4) it gives [n_layers, n_heads]."""
    return ((donor[None] - activations) * gradients).sum(sum_axes).mean(0)


def gap_share(patched: np.ndarray | float, safe: float, toxic: float) -> np.ndarray:
    """(patched - safe) / (toxic - safe): 0 = no change, 1 = the whole toxic-safe gap."""
    return (np.asarray(patched) - safe) / (toxic - safe)
