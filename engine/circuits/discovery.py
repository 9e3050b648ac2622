"""Sparse feature circuits (Marks et al. 2024) over SAEs at a few residual-stream hooks.

A node is one SAE feature, or one SAE's error term (x - x_hat), at the prompt-end positions (the
last instruction token and the template tokens after it, where Arditi et al. read the refusal
decision), summed over those positions. Effects are measured against a baseline: the mean
activation of a reference prompt group at the same position, in the SAE's codes and error alike.

- `node_effects`: attribution patching, (f - f_baseline) * (W_dec . grad), per prompt.
- `circuit_hooks` + `metric_values`: the exact counterpart, which mean-ablates every node outside a
  kept set at every SAE'd hook at once; downstream SAEs read the already-patched stream.
- `faithfulness_curve`: the fraction of the metric a circuit keeps, (m(C) - m(empty)) / (m(all) - m(empty)).
- `edge_effects`: upstream node -> downstream node, (u - u_baseline) * d(grad-weighted d)/du.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE

from engine.circuits.attribution import SiteGradients
from engine.circuits.refusal_metric import RefusalMetric
from engine.runtime.activations import body_until_captured, stop_when_complete
from engine.runtime.generation import EncodedBatch, map_encoded
from engine.runtime.interventions import Hook, applied
from engine.runtime.models import LoadedModel
from engine.runtime.scoring import next_token_logprobs
from engine.saes.features import baseline_means, feature_attribution

ERROR = -1  # the `feature` of an SAE's error node


@dataclass(frozen=True)
class SaeSite:
    """An SAE and the mean of its codes and error term over a baseline prompt group."""

    hook: str
    sae: SAE
    baseline_codes: torch.Tensor  # [n_offsets, d_sae]
    baseline_error: torch.Tensor  # [n_offsets, d_in]

    @property
    def n_nodes(self) -> int:
        return self.sae.cfg.d_sae + 1  # the features, then the error node

    def baseline_activation(self) -> np.ndarray:
        """The baseline's mean activation [n_offsets, d_in] (decode is affine, so this is exact)."""
        with torch.inference_mode():
            return (self.sae.decode(self.baseline_codes) + self.baseline_error).float().cpu().numpy()


def sae_site(hook: str, sae: SAE, baseline_activations: np.ndarray) -> SaeSite:
    """An SAE with its baseline from activations [m, n_offsets, d_in] of the reference prompts."""
    return SaeSite(hook, sae, *baseline_means(sae, baseline_activations))


def node_table(sites: Sequence[SaeSite]) -> pd.DataFrame:
    """One row per node, in the column order of `NodeEffects.effects`."""
    return pd.DataFrame({
        "hook": np.concatenate([[site.hook] * site.n_nodes for site in sites]),
        "feature": np.concatenate([np.r_[np.arange(site.sae.cfg.d_sae), ERROR] for site in sites]),
    })


@dataclass(frozen=True)
class NodeEffects:
    nodes: pd.DataFrame  # hook, feature (ERROR for the error node)
    effects: np.ndarray  # [n_prompts, n_nodes] attribution-patching effect on the metric
    metric: np.ndarray  # [n_prompts]


def node_effects(sites: Sequence[SaeSite], gradients: SiteGradients) -> NodeEffects:
    """Per-prompt node effects from metric gradients taken at the sites' hooks, in that order."""
    columns = []
    for h, site in enumerate(sites):
        attribution = feature_attribution(site.sae, gradients.activations[:, h], gradients.gradients[:, h],
                                          (site.baseline_codes, site.baseline_error))
        columns += [attribution.feature_effects, attribution.error_effects[:, None]]
    return NodeEffects(node_table(sites), np.concatenate(columns, axis=1), gradients.metric)


def circuit_hooks(sites: Sequence[SaeSite], offsets: Sequence[int], kept: np.ndarray) -> list[Hook]:
    """Hooks that mean-ablate every node not in `kept` (bool over `node_table(sites)`) at the
    prompt-end positions: codes and error outside the circuit take their baseline means."""
    index = torch.tensor(list(offsets))
    hooks, start = [], 0
    for site in sites:
        keep = torch.from_numpy(np.asarray(kept[start : start + site.n_nodes], dtype=bool))
        start += site.n_nodes

        def patch(activation: torch.Tensor, hook: object, site: SaeSite = site, keep: torch.Tensor = keep):
            x = activation[:, index].float().to(site.sae.device)
            codes = site.sae.encode(x)
            error = x - site.sae.decode(codes)
            codes = torch.where(keep[:-1].to(codes.device), codes, site.baseline_codes)
            error = error if keep[-1] else site.baseline_error.expand_as(error)
            activation = activation.clone()
            activation[:, index] = (site.sae.decode(codes) + error).to(activation.device, activation.dtype)
            return activation

        hooks.append((site.hook, patch))
    if start != len(kept):
        raise ValueError(f"kept has {len(kept)} entries for {start} nodes")
    return hooks


def metric_values(model: LoadedModel, instructions: Sequence[str], metric: RefusalMetric, *, batch_size: int,
                  hooks: Sequence[Hook] = ()) -> np.ndarray:
    """The metric per prompt, with `hooks` attached."""
    with applied(model, hooks):
        logprobs = next_token_logprobs(model, instructions, batch_size=batch_size)
    return metric(torch.from_numpy(logprobs)).numpy()


@dataclass(frozen=True)
class FaithfulnessCurve:
    n_nodes: np.ndarray  # circuit sizes (top nodes by |mean effect|)
    metric: np.ndarray  # mean metric with everything outside that circuit mean-ablated
    faithfulness: np.ndarray  # (metric - empty) / (full - empty)
    full: float  # mean metric of the unpatched model
    empty: float  # mean metric with every node mean-ablated


def faithfulness_curve(model: LoadedModel, instructions: Sequence[str], sites: Sequence[SaeSite],
                       offsets: Sequence[int], order: np.ndarray, sizes: Sequence[int], metric: RefusalMetric,
                       *, batch_size: int) -> FaithfulnessCurve:
    """Faithfulness of the top-`size` nodes of `order`, for each size."""
    n_nodes = sum(site.n_nodes for site in sites)

    def mean_metric(size: int) -> float:
        kept = np.zeros(n_nodes, dtype=bool)
        kept[order[:size]] = True
        return float(metric_values(model, instructions, metric, batch_size=batch_size,
                                   hooks=circuit_hooks(sites, offsets, kept)).mean())

    full = float(metric_values(model, instructions, metric, batch_size=batch_size).mean())
    empty = mean_metric(0)
    values = np.array([mean_metric(size) for size in sizes])
    gap = full - empty
    faithfulness = (values - empty) / gap if abs(gap) > 1e-6 else np.full(len(sizes), np.nan)
    return FaithfulnessCurve(np.asarray(sizes), values, faithfulness, full, empty)


def edge_effects(model: LoadedModel, instructions: Sequence[str], upstream: SaeSite, downstream: SaeSite,
                 offsets: Sequence[int], downstream_gradients: np.ndarray, upstream_nodes: Sequence[int],
                 downstream_nodes: Sequence[int], *, batch_size: int) -> np.ndarray:
    """Mean over prompts of each edge's effect, [len(downstream_nodes), len(upstream_nodes)].

    Node ids are features or ERROR. A downstream node d contributes D = sum over positions of
    (W_dec[d] . grad) * f_d (the error node: grad . error), the gradient fixed at
    `downstream_gradients` [n_prompts, n_offsets, d_in] (the metric's gradient at the downstream
    hook); the edge from upstream u is (u - u_baseline) * (W_dec[u] . dD/dx_upstream), summed over
    positions. The forward pass stops at the downstream hook."""
    index = torch.tensor(list(offsets))
    up_features = torch.tensor([u for u in upstream_nodes if u != ERROR], dtype=torch.long)
    down_order = list(downstream_nodes)
    totals = np.zeros((len(down_order), len(upstream_nodes)))
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(activation: torch.Tensor, hook: object) -> torch.Tensor:
            if name == upstream.hook:
                activation = activation.detach().requires_grad_(True)
            captured[name] = activation
            stop_when_complete(captured, [upstream.hook, downstream.hook])
            return activation
        return hook

    w_up = upstream.sae.W_dec.detach().float()
    w_down = downstream.sae.W_dec.detach().float()

    def forward(batch: list[int], encoded: EncodedBatch) -> np.ndarray:
        captured.clear()
        body_until_captured(model, encoded.forward_inputs(), grad=True)
        x_up = captured[upstream.hook]
        up = x_up[:, index].detach().float().to(upstream.sae.device)
        with torch.no_grad():
            up_codes = upstream.sae.encode(up)
            up_delta = (up_codes - upstream.baseline_codes)[..., up_features]  # [b, pos, n_up_features]
            up_error_delta = up - upstream.sae.decode(up_codes) - upstream.baseline_error
        x_down = captured[downstream.hook][:, index].float().to(downstream.sae.device)
        codes = downstream.sae.encode(x_down)
        down_error = x_down - downstream.sae.decode(codes)
        grad = torch.from_numpy(downstream_gradients[batch]).float().to(downstream.sae.device)
        sums = np.zeros_like(totals)
        for row, d in enumerate(down_order):
            if d == ERROR:
                weighted = (down_error * grad).sum()
            else:
                weighted = (codes[..., d] * (grad @ w_down[d])).sum()
            d_up = torch.autograd.grad(weighted, x_up, retain_graph=True)[0][:, index].float().to(w_up.device)
            features = (up_delta * (d_up @ w_up[up_features].T)).sum((0, 1))  # [n_up_features]
            error = float((up_error_delta * d_up).sum())
            it = iter(features.tolist())
            sums[row] = [error if u == ERROR else next(it) for u in upstream_nodes]
        return sums

    with applied(model, [(upstream.hook, keep(upstream.hook)), (downstream.hook, keep(downstream.hook))]), \
            torch.enable_grad():
        for _, sums in map_encoded(model, instructions, batch_size, forward, desc="edges",
                                    keep_last=-min(offsets)):
            totals += sums
    return totals / len(instructions)
