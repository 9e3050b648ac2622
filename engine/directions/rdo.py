"""Refusal direction optimisation (RDO; Wollschläger et al., ICML 2025).

Difference-of-means gives one direction per layer; RDO searches by gradient for a k-dimensional
subspace whose ablation (projected out at every layer and position) removes refusal on toxic prompts
while the safe prompts' next-token distribution stays close to the unablated model's:

    loss = mean -log(1 - p_refuse) on toxic prompts (p_refuse: the refusal tokens' probability, ablated)
           + kl_weight * mean KL(unablated || ablated) on safe prompts

The refusal term is the cross-entropy of "does not refuse": it goes to 0 once refusal is gone, so
the KL term then decides. (The log-odds themselves have no floor: minimised, they buy ever more
negative scores with KL, 1.4 nats on the demo's safe prompts after 60 steps.)

The k directions are the orthonormal basis of a free [k, d_model] parameter (QR), so they stay
orthogonal and only their span matters. Optimised with Adam from a given start (e.g. the
difference-of-means direction) or a seeded random one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from engine.errors import ExplorerError
from engine.judging.judge import refusal_log_odds
from engine.runtime.generation import EncodedBatch, map_encoded
from engine.runtime.interventions import applied, every_position
from engine.runtime.models import LoadedModel
from engine.runtime.scoring import next_token_logprobs

SITES = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")


@dataclass(frozen=True)
class RdoSettings:
    k: int = 1
    steps: int = 60
    lr: float = 0.05
    kl_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 64 or not 1 <= self.steps <= 100_000 or not 0 < self.lr < 10 or self.kl_weight < 0:
            raise ExplorerError(f"RDO settings out of range: {self}.",
                                "use k 1-64, steps 1-100000, lr in (0, 10), kl_weight >= 0.")


@dataclass(frozen=True)
class RdoResult:
    directions: np.ndarray  # [k, d_model], orthonormal
    history: pd.DataFrame  # step, refusal (mean toxic refusal loss), kl (mean safe KL), loss


def refusal_loss(refusal_token_logprobs: torch.Tensor) -> torch.Tensor:
    """-log(1 - p) per row, p the refusal tokens' total probability ([n, n_tokens] log-probs): softplus
    of the refusal log-odds, near 0 (and flat) once refusal is unlikely."""
    return torch.nn.functional.softplus(refusal_log_odds(refusal_token_logprobs))


def _basis(parameter: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(parameter.T).Q  # [d_model, k], orthonormal columns, differentiable


def optimise_refusal_directions(model: LoadedModel, toxic: Sequence[str], safe: Sequence[str],
                                refusal_token_ids: Sequence[int], settings: RdoSettings, *,
                                start: np.ndarray | None = None, batch_size: int = 32) -> RdoResult:
    """RDO's k orthonormal directions (rows), and the loss along the way."""
    if not toxic or not safe:
        raise ExplorerError("RDO needs toxic and safe prompts.", "pass at least one of each.")
    generator = torch.Generator().manual_seed(settings.seed)
    initial = torch.randn(settings.k, model.d_model, generator=generator)
    if start is not None:
        rows = torch.as_tensor(np.atleast_2d(start), dtype=torch.float32)[: settings.k]
        initial[: len(rows)] = rows / rows.norm(dim=1, keepdim=True)
    parameter = torch.nn.Parameter(initial.to(model.device))
    optimiser = torch.optim.Adam([parameter], lr=settings.lr)
    ids = torch.tensor(list(refusal_token_ids), dtype=torch.long)
    plain = torch.from_numpy(next_token_logprobs(model, list(safe), batch_size=batch_size)).to(model.device)

    @every_position
    def project_out(activation: torch.Tensor, hook: object) -> torch.Tensor:
        basis = _basis(parameter).to(activation.dtype)
        return activation - (activation @ basis) @ basis.T

    hooks = [(f"blocks.{layer}.{site}", project_out) for layer in range(model.n_layers) for site in SITES]

    def mean_over(prompts: Sequence[str], term) -> torch.Tensor:
        """The mean of `term(batch rows, last-position log-probs)` over prompts, as a graph."""
        total = torch.zeros((), device=model.device)

        def work(batch: list[int], encoded: EncodedBatch) -> torch.Tensor:
            logits = model.hf_model(**encoded.forward_inputs(), logits_to_keep=1).logits[:, -1, :]
            return term(batch, torch.log_softmax(logits.float(), dim=-1)).sum()

        for _, value in map_encoded(model, list(prompts), batch_size, work, desc="rdo", reuse_head=False):
            total = total + value
        return total / len(prompts)

    history = []
    for step in tqdm(range(settings.steps), desc=f"RDO, k = {settings.k}", unit="step", leave=False):
        optimiser.zero_grad()
        with applied(model, hooks), torch.enable_grad():
            refusal = mean_over(toxic, lambda batch, logprobs: refusal_loss(logprobs[:, ids.to(logprobs.device)]))
            kl = mean_over(safe, lambda batch, logprobs: (plain[batch].exp() * (plain[batch] - logprobs)).sum(-1))
            loss = refusal + settings.kl_weight * kl
            loss.backward()
        optimiser.step()
        history.append({"step": step, "refusal": refusal.item(), "kl": kl.item(), "loss": loss.item()})
    with torch.no_grad():
        directions = _basis(parameter).T.cpu().numpy()
    return RdoResult(directions, pd.DataFrame(history))
