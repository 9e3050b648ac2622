"""Causal tests of candidate refusal directions, by intervening on a loaded model.

Each candidate gets three numbers on validation prompts (Arditi et al. 2024):
- ablation score: mean refusal score on toxic prompts with the direction ablated (lower is better);
- induce score: mean refusal score on safe prompts with the direction added at its layer;
- KL: mean KL divergence of the next-token distribution on safe prompts under ablation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from engine.interventions import ablation_hooks, addition_hooks, applied
from engine.judge import refusal_score
from engine.models import LoadedModel
from engine.scoring import kl_divergence, next_token_logprobs


def score_candidates(
    model: LoadedModel,
    candidates: np.ndarray,
    layers: Sequence[int],
    position_labels: Sequence[str],
    refusal_token_ids: Sequence[int],
    toxic_prompts: Sequence[str],
    safe_prompts: Sequence[str],
    *,
    alpha: float | None,
    batch_size: int,
) -> pd.DataFrame:
    """Score `candidates[layer, position]` ([n_layers, n_positions, d_model]) for the given layers.

    Addition uses `alpha` times the unit direction, or the candidate's own norm when None."""
    ids = list(refusal_token_ids)
    baseline_safe = next_token_logprobs(model, safe_prompts, batch_size=batch_size)
    both = list(toxic_prompts) + list(safe_prompts)
    n_toxic = len(toxic_prompts)
    rows = []
    pairs = [(layer, position) for layer in layers for position in range(candidates.shape[1])]
    for layer, position in tqdm(pairs, desc="score candidates", unit="candidate"):
        direction = torch.from_numpy(candidates[layer, position])
        if float(direction.norm()) == 0.0:
            # e.g. layer 0 at a template token: every prompt has the same activation there
            rows.append({"layer": layer, "position": position, "position_label": position_labels[position],
                         "ablation_score": np.nan, "induce_score": np.nan, "kl": np.nan})
            continue
        with applied(model, ablation_hooks(model, direction)):
            ablated = next_token_logprobs(model, both, batch_size=batch_size)
        with applied(model, addition_hooks(model, direction, layer, alpha)):
            added = next_token_logprobs(model, safe_prompts, batch_size=batch_size, token_ids=ids)
        rows.append({
            "layer": layer,
            "position": position,
            "position_label": position_labels[position],
            "ablation_score": float(refusal_score(ablated[:n_toxic][:, ids]).mean()),
            "induce_score": float(refusal_score(added).mean()),
            "kl": float(kl_divergence(baseline_safe, ablated[n_toxic:]).mean()),
        })
    return pd.DataFrame(rows)


def refusal_scores_under_ablation(
    model: LoadedModel,
    direction: torch.Tensor | None,
    prompts: Sequence[str],
    refusal_token_ids: Sequence[int],
    *,
    batch_size: int,
) -> np.ndarray:
    """Per-prompt refusal score with `direction` ablated (no intervention when None)."""
    hooks = [] if direction is None else ablation_hooks(model, direction)
    with applied(model, hooks):
        logprobs = next_token_logprobs(model, prompts, batch_size=batch_size, token_ids=list(refusal_token_ids))
    return refusal_score(logprobs)
