"""Which attention heads and MLPs carry the refusal decision: activation patching, toxic -> safe.

A site's output at the prompt-end positions of safe prompts is replaced by its mean over a group of
toxic prompts (one harm category) at the same positions; the site's effect is the share of the
toxic-safe metric gap that this alone moves, (m_patched - m_safe) / (m_toxic - m_safe). Attention and
MLP outputs per layer are patched exactly. Heads (`attn.hook_z`, one slice per head) are estimated
by attribution patching, (z_toxic_mean - z) . grad, and the strongest are then patched exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.circuits import metric_values
from engine.models import LoadedModel
from engine.refusal_metric import RefusalMetric


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


@dataclass(frozen=True)
class HeadAttribution:
    effects: np.ndarray  # [n_layers, n_heads] mean metric change estimated for patching each head


def head_attribution(safe_z: np.ndarray, safe_gradients: np.ndarray, toxic_mean_z: np.ndarray) -> HeadAttribution:
    """Attribution patching of every head: (toxic_mean_z - z) . grad summed over positions and
    d_head, averaged over the safe prompts. safe_z and safe_gradients [n, n_layers, n_offsets,
    n_heads, d_head]; toxic_mean_z [n_layers, n_offsets, n_heads, d_head]."""
    effects = ((toxic_mean_z[None] - safe_z) * safe_gradients).sum((2, 4)).mean(0)
    return HeadAttribution(effects)


def gap_share(patched: np.ndarray | float, safe: float, toxic: float) -> np.ndarray:
    """(patched - safe) / (toxic - safe): 0 = no change, 1 = the whole toxic-safe gap."""
    return (np.asarray(patched) - safe) / (toxic - safe)
