"""Sparse feature circuits on a tiny model: attribution against exact patching, faithfulness,
edges, head/MLP patching, and the metric."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from engine.circuits.attribution import integrated_gradients, metric_gradients
from engine.circuits.components import gap_share, patched_metric, patching_attribution
from engine.circuits.discovery import (
    ERROR,
    circuit_hooks,
    edge_effects,
    faithfulness_curve,
    metric_values,
    node_effects,
    sae_site,
)
from engine.circuits.refusal_metric import RefusalMetric, compliance_token_ids
from engine.circuits.similarity import ranked_nodes
from engine.data.paths import BUILTIN_PROMPTS
from engine.errors import ExplorerError
from engine.runtime.activations import capture, capture_tokens, prompt_end_positions
from engine.runtime.interventions import applied
from engine.saes.corpus import chat_corpus
from engine.saes.training import SaeTraining, train_sae

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


@pytest.fixture(scope="module")
def prompts() -> pd.DataFrame:
    return pd.read_csv(BUILTIN_PROMPTS)


@pytest.fixture(scope="module")
def setup(tiny_model, prompts):
    """SAEs trained on the tiny model's activations over the built-in prompts, and the pieces a
    circuit needs: toxic prompts, a safe baseline, the metric, prompt-end offsets."""
    corpus = chat_corpus(tiny_model.tokenizer, list(prompts["text"]), [""] * len(prompts))
    tokens = capture_tokens(tiny_model, corpus.sequences, HOOKS, batch_size=64,
                            skip_token_ids=tiny_model.tokenizer.all_special_ids)
    training = SaeTraining(architecture="topk", expansion=2, k=8, steps=150, batch_size=256, lr=3e-3)
    saes = [train_sae(training, torch.from_numpy(tokens.values[:, h].copy()), hook, "tiny")
            for h, hook in enumerate(HOOKS)]
    offsets = prompt_end_positions(tiny_model.tokenizer).offsets
    toxic = list(prompts.query("kind == 'toxic'")["text"][:8])
    safe = list(prompts.query("kind == 'safe'")["text"][:16])
    baseline = capture(tiny_model, safe, HOOKS, offsets, batch_size=16)
    sites = [sae_site(hook, sae, baseline[:, h]) for h, (hook, sae) in enumerate(zip(HOOKS, saes, strict=True))]
    metric = RefusalMetric("refusal_score", tuple(tiny_model.tokenizer.convert_tokens_to_ids(["I", "sorry"])))
    return {"sites": sites, "offsets": offsets, "toxic": toxic, "safe": safe, "baseline": baseline,
            "metric": metric}


def _set_to(value: np.ndarray, offsets):
    """A hook setting the activation at the prompt-end `offsets` to `value` [n_offsets, d]."""
    index = torch.tensor(list(offsets))

    def hook(activation, hook):
        activation = activation.clone()
        activation[:, index] = torch.from_numpy(value).to(activation.dtype)
        return activation
    return hook


def _effects(tiny_model, setup):
    gradients = metric_gradients(tiny_model, setup["toxic"], HOOKS, setup["offsets"], setup["metric"], batch_size=4)
    return gradients, node_effects(setup["sites"], gradients)


def test_attribution_patching_agrees_with_exact_patching(tiny_model, setup) -> None:
    """Node effects by attribution patching rank the top nodes like patching each node to its
    baseline mean, one at a time, with the model's own forward pass."""
    _, effects = _effects(tiny_model, setup)
    assert effects.effects.shape == (8, len(effects.nodes))
    assert set(effects.nodes.query("feature == @ERROR")["hook"]) == set(HOOKS)
    mean = effects.effects.mean(0)
    top = ranked_nodes(mean, max_nodes=10)
    full = metric_values(tiny_model, setup["toxic"], setup["metric"], batch_size=8).mean()
    assert full == pytest.approx(effects.metric.mean(), abs=1e-4)
    exact = []
    for node in top:
        kept = np.ones(len(effects.nodes), dtype=bool)
        kept[node] = False
        patched = metric_values(tiny_model, setup["toxic"], setup["metric"], batch_size=8,
                                hooks=circuit_hooks(setup["sites"], setup["offsets"], kept))
        exact.append(full - patched.mean())
    assert stats.spearmanr(mean[top], exact).statistic >= 0.8
    assert np.mean(np.sign(mean[top]) == np.sign(exact)) >= 0.8


def test_integrated_gradients_are_closer_to_exact_than_one_step(tiny_model, setup) -> None:
    """IG's effects sum (features + error, per hook) to the exact change from the baseline mean
    at that hook better than plain attribution's do (the completeness axiom)."""
    sites, offsets, metric, toxic = setup["sites"], setup["offsets"], setup["metric"], setup["toxic"]
    baseline_mean = setup["baseline"].mean(0)
    ig = node_effects(sites, integrated_gradients(tiny_model, toxic, HOOKS, offsets, metric, baseline_mean,
                                                  steps=8, batch_size=4))
    _, plain = _effects(tiny_model, setup)
    for h, hook in enumerate(HOOKS):
        exact = metric_values(tiny_model, toxic, metric, batch_size=8) - metric_values(
            tiny_model, toxic, metric, batch_size=8, hooks=[(hook, _set_to(baseline_mean[h], offsets))])
        columns = (ig.nodes["hook"] == hook).to_numpy()
        ig_error = np.abs(ig.effects[:, columns].sum(1) - exact).mean()
        plain_error = np.abs(plain.effects[:, columns].sum(1) - exact).mean()
        assert ig_error <= plain_error + 1e-6
        assert ig_error <= 0.1 * np.abs(exact).mean() + 1e-3


def test_faithfulness_is_one_for_everything_and_zero_for_nothing(tiny_model, setup) -> None:
    sites, offsets, metric, toxic = setup["sites"], setup["offsets"], setup["metric"], setup["toxic"]
    _, effects = _effects(tiny_model, setup)
    order = ranked_nodes(effects.effects.mean(0))
    curve = faithfulness_curve(tiny_model, toxic, sites, offsets, order, [0, 5, len(order)], metric, batch_size=8)
    assert curve.faithfulness[0] == pytest.approx(0.0, abs=1e-6)
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-3)
    # Nothing kept = both hooks' prompt-end activations replaced by the baseline's mean.
    mean = setup["baseline"].mean(0)
    empty = metric_values(tiny_model, toxic, metric, batch_size=8,
                          hooks=[(hook, _set_to(mean[h], offsets)) for h, hook in enumerate(HOOKS)])
    assert curve.empty == pytest.approx(float(empty.mean()), abs=1e-3)


def test_edges_agree_with_exact_patching_of_the_upstream_node(tiny_model, setup) -> None:
    """Edge u -> d: the change in d's gradient-weighted activation when u alone is patched to its
    baseline mean upstream, against the linear estimate."""
    sites, offsets, toxic = setup["sites"], setup["offsets"], setup["toxic"]
    gradients, effects = _effects(tiny_model, setup)
    down_grad = gradients.gradients[:, 1]
    d_sae = sites[0].sae.cfg.d_sae
    downstream = int(ranked_nodes(effects.effects.mean(0)[d_sae + 1 : -1], max_nodes=1)[0])
    upstream = [*range(d_sae), ERROR]
    edges = edge_effects(tiny_model, toxic, sites[0], sites[1], offsets, down_grad, upstream, [downstream],
                         batch_size=4)[0]
    assert edges.shape == (d_sae + 1,)
    weight = down_grad @ sites[1].sae.W_dec.detach().numpy()[downstream]  # [n, offsets]

    def weighted_activation(hooks) -> float:
        with applied(tiny_model, hooks):
            x = capture(tiny_model, toxic, [HOOKS[1]], offsets, batch_size=8)[:, 0]
        with torch.inference_mode():
            codes = sites[1].sae.encode(torch.from_numpy(x)).numpy()[..., downstream]
        return float((codes * weight).sum(1).mean())

    clean = weighted_activation([])
    top = ranked_nodes(edges, max_nodes=6)
    exact = []
    for u in top:
        kept = np.ones(d_sae + 1, dtype=bool)
        kept[u] = False
        exact.append(clean - weighted_activation(circuit_hooks(sites[:1], offsets, kept)))
    assert stats.spearmanr(edges[top], exact).statistic >= 0.7
    assert np.mean(np.sign(edges[top]) == np.sign(exact)) >= 0.8


def test_head_patching_by_attribution_and_exactly(tiny_model, setup) -> None:
    offsets, metric, toxic, safe = setup["offsets"], setup["metric"], setup["toxic"], setup["safe"][:6]
    hooks = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    toxic_z = capture(tiny_model, toxic, hooks, offsets, batch_size=8).mean(0)  # [2, offsets, heads, d_head]
    assert toxic_z.shape == (2, len(offsets), 4, 16)
    gradients = metric_gradients(tiny_model, safe, hooks, offsets, metric, batch_size=6)
    estimated = patching_attribution(gradients.activations, gradients.gradients, toxic_z, (2, 4))
    assert estimated.shape == (2, 4)
    clean = metric_values(tiny_model, safe, metric, batch_size=6).mean()
    exact = np.array([[patched_metric(tiny_model, safe, hooks[layer], offsets, toxic_z[layer][:, head], metric,
                                      batch_size=6, head=head) - clean for head in range(4)] for layer in range(2)])
    assert stats.spearmanr(estimated.ravel(), exact.ravel()).statistic >= 0.7
    # Patching a whole layer's attention output with its own values changes nothing.
    own = capture(tiny_model, safe[:1], ["blocks.1.hook_attn_out"], offsets, batch_size=1)[0, 0]
    assert patched_metric(tiny_model, safe[:1], "blocks.1.hook_attn_out", offsets, own, metric,
                          batch_size=1) == pytest.approx(metric_values(tiny_model, safe[:1], metric, batch_size=1)[0],
                                                         abs=1e-4)
    assert gap_share(np.array([1.0, 3.0]), safe=1.0, toxic=5.0).tolist() == [0.0, 0.5]


def test_metrics_by_hand() -> None:
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    refusal = RefusalMetric("refusal_score", (0,))
    p = torch.softmax(logits, -1)[0, 0]
    assert float(refusal(logits)[0]) == pytest.approx(float(torch.log(p / (1 - p))), abs=1e-5)
    diff = RefusalMetric("logit_diff", (0, 1), (2,))
    assert float(diff(logits)[0]) == pytest.approx(float(np.log(np.exp(2) + 1) - 1), abs=1e-5)
    assert compliance_token_ids([5, 5, 7, 0, 8], [False, False, False, True, False], [0], n_tokens=2) == (5, 7)
    with pytest.raises(ExplorerError, match="Unknown circuit metric 'odds'"):
        RefusalMetric("odds", (0,))
    with pytest.raises(ExplorerError, match="logit_diff needs compliance tokens"):
        RefusalMetric("logit_diff", (0,))
    with pytest.raises(ExplorerError, match="both refusal and compliance"):
        RefusalMetric("logit_diff", (0,), (0, 1))
