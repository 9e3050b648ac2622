"""Gradients of the refusal score with respect to activations at hook sites.

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

from engine.errors import ExplorerError
from engine.generation import encode_batches
from engine.interventions import applied
from engine.judge import refusal_log_odds
from engine.models import LoadedModel


@dataclass(frozen=True)
class SiteGradients:
    """Per prompt: activations and refusal-score gradients at (hook, offset) sites, and the score."""

    activations: np.ndarray  # [n_prompts, n_hooks, n_offsets, d_model]
    gradients: np.ndarray  # same shape
    refusal_score: np.ndarray  # [n_prompts]


def refusal_score_gradients(
    model: LoadedModel,
    instructions: Sequence[str],
    hook_names: Sequence[str],
    offsets: Sequence[int],
    refusal_token_ids: Sequence[int],
    *,
    batch_size: int,
    desc: str = "gradients",
) -> SiteGradients:
    """Gradients of each prompt's refusal score (at the first response position) with respect to
    the activations at `hook_names`, read at negative `offsets` from the prompt's end."""
    missing = [name for name in hook_names if name not in model.bridge.hook_dict]
    if missing:
        raise ExplorerError(f"{model.name} has no hook(s) {missing}.",
                            "use TransformerLens hook names such as blocks.3.hook_resid_pre.")
    shape = (len(instructions), len(hook_names), len(offsets), model.d_model)
    activations, gradients = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    scores = np.zeros(len(instructions))
    index = torch.tensor(list(offsets))
    wanted = torch.tensor(list(refusal_token_ids), dtype=torch.long, device=model.device)
    sites: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(activation: torch.Tensor, hook: object) -> torch.Tensor:
            if not activation.requires_grad:  # frozen weights: start the graph here
                activation = activation.detach().requires_grad_(True)
            sites[name] = activation
            return activation
        return hook

    with tqdm(total=len(instructions), desc=desc, unit="prompt", leave=False) as bar, \
            applied(model, [(name, keep(name)) for name in hook_names]), torch.enable_grad():
        for batch, encoded in encode_batches(model, instructions, batch_size):
            sites.clear()
            logits = model.hf_model(**encoded, logits_to_keep=1).logits[:, -1, :]
            score = refusal_log_odds(torch.log_softmax(logits.float(), dim=-1)[:, wanted])
            # Each prompt's score depends on its own row only, so the sum's gradient is per prompt.
            grads = torch.autograd.grad(score.sum(), [sites[name] for name in hook_names])
            activations[batch] = torch.stack([sites[n][:, index] for n in hook_names], 1).detach().float().cpu().numpy()
            gradients[batch] = torch.stack([g[:, index] for g in grads], 1).float().cpu().numpy()
            scores[batch] = score.detach().cpu().numpy()
            bar.update(len(batch))
    return SiteGradients(activations, gradients, scores)
