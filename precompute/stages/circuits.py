"""Stage `circuits`: a sparse feature circuit per harm category and kind, and how alike they are.

1. Node effects (attribution patching or integrated gradients) of every SAE feature and error term
   at the `saes` stage's hooks, per prompt, for each category's toxic, hard and safe prompts.
   Toxic and hard prompts are patched towards the mean safe prompt; safe prompts towards the mean
   toxic prompt (which nodes keep a safe prompt from being refused).
2. The circuit: the top nodes by |mean effect|; its faithfulness under mean ablation of everything
   else, as a curve over sizes; edges between its nodes at consecutive SAE'd hooks.
3. Head and MLP patching, toxic -> safe, per category.
4. Comparison: cosine and Jaccard for every pair of circuits with bootstrap CIs, permutation
   p-values, split-half ceilings, the shared core, and a verdict per kind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from engine.activations import capture, prompt_end_positions
from engine.attribution import integrated_gradients, metric_gradients
from engine.circuit_stats import (
    check_sample_size,
    pairwise_similarity,
    permutation_p,
    ranked_nodes,
    shared_core,
    split_half,
    verdict,
)
from engine.circuits import (
    NodeEffects,
    SaeSite,
    edge_effects,
    faithfulness_curve,
    node_effects,
    node_table,
    sae_site,
)
from engine.components import gap_share, head_sites, layer_sites, patched_metric, patching_attribution
from engine.errors import ExplorerError
from engine.judge import refusal_token_ids
from engine.models import LoadedModel
from engine.refusal_metric import RefusalMetric, compliance_token_ids
from engine.saes import load_sae, stored_sae_source
from precompute.config import CircuitsConfig
from precompute.pipeline import ShardContext, ShardRound, StageContext, StageOutput
from precompute.shards import ShardSpec, in_shard
from precompute.stages.section import ModelSectionStage

logger = logging.getLogger(__name__)

BASELINE_KIND = {"toxic": "safe", "hard": "safe", "safe": "toxic"}  # what each kind is patched towards


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The frames as one (none: an empty table, e.g. a shard without circuits)."""
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@dataclass(frozen=True)
class CircuitSetup:
    """What every circuit needs: the model, its SAEs' sites and baselines, the metric and groups."""

    model: LoadedModel
    prompts: pd.DataFrame
    sae_rows: list[dict[str, Any]]
    hooks: list[str]
    offsets: tuple[int, ...]
    metric: RefusalMetric
    groups: dict[tuple[str, str], pd.DataFrame]  # (kind, category): its prompts
    status: list[dict[str, Any]]  # a row per group: enough prompts or skipped
    sites: dict[str, list[SaeSite]]  # per reference kind: the SAE sites with its baseline


class CircuitsStage(ModelSectionStage):
    name = "circuits"
    version = 1
    upstream = ("prompts", "generate", "saes")
    # Sharded by (kind, category) group: each shard finds its groups' circuits and keeps their
    # per-prompt node effects; the merge compares every pair.
    shardable = True
    shard_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "node_effects": ("kind", "category", "prompt"), "circuit_nodes": ("kind", "category", "node"),
        "circuit_faithfulness": ("kind", "category", "n_nodes")}


    @staticmethod
    def _metric(context: StageContext, settings: CircuitsConfig) -> RefusalMetric:
        refusal = tuple(refusal_token_ids(context.table("refusal_tokens"), settings.model))
        answers = context.table("generations").query("model == @settings.model and condition == 'baseline'")
        compliance = compliance_token_ids(answers["first_token_id"].tolist(), answers["refused"].tolist(), refusal)
        return RefusalMetric(settings.metric, refusal, compliance if settings.metric == "logit_diff" else ())

    @staticmethod
    def _groups(prompts: pd.DataFrame, settings: CircuitsConfig) -> tuple[dict[tuple[str, str], pd.DataFrame],
                                                                           list[dict[str, Any]]]:
        """Each (kind, category)'s prompts (a seeded sample of at most max_prompts), and a status
        row per group saying whether it has enough prompts for the statistics."""
        rng = np.random.default_rng(settings.seed)
        groups, status = {}, []
        for (kind, category), group in prompts.groupby(["kind", "category"], sort=True):
            if kind not in settings.kinds:
                continue
            if len(group) > settings.max_prompts:
                group = group.iloc[np.sort(rng.choice(len(group), settings.max_prompts, replace=False))]
            try:
                check_sample_size(f"{kind}/{category}", len(group), settings.min_prompts)
            except ExplorerError as error:
                logger.warning("%s", error)
                status.append({"kind": kind, "category": category, "n_prompts": len(group), "status": "skipped",
                               "message": str(error)})
                continue
            groups[(kind, category)] = group
            status.append({"kind": kind, "category": category, "n_prompts": len(group), "status": "ok",
                           "message": ""})
        return groups, status

    def _setup(self, context: StageContext) -> CircuitSetup:
        """The model, its SAEs, the metric, the prompt groups and their baselines."""
        config = context.config
        settings: CircuitsConfig = config.circuits
        model = config.generation.load(config.models[settings.model])
        prompts = context.table("prompts").drop(columns="run_id").reset_index(drop=True)
        sae_rows = context.table("saes").sort_values("layer").to_dict("records")
        hooks = [row["hook"] for row in sae_rows]
        saes = [load_sae(*stored_sae_source(config.store, row), device=model.device) for row in sae_rows]
        offsets = prompt_end_positions(model.tokenizer).offsets
        groups, status = self._groups(prompts, settings)
        if not groups:
            raise ExplorerError(f"No category has {settings.min_prompts}+ prompts of kinds {list(settings.kinds)}.",
                                "add prompts, or lower circuits.min_prompts.")
        # Baselines: the mean activation of a sample of each reference kind, per hook and position.
        rng = np.random.default_rng(settings.seed)
        sites: dict[str, list[SaeSite]] = {}
        for kind in sorted({BASELINE_KIND[k] for k in settings.kinds}):
            texts = prompts.loc[prompts["kind"] == kind, "text"].to_numpy()
            sample = list(texts[rng.choice(len(texts), min(len(texts), 4 * settings.max_prompts), replace=False)])
            activations = capture(model, sample, hooks, offsets, batch_size=config.generation.batch_size,
                                  desc=f"{kind} baseline")
            sites[kind] = [sae_site(hook, sae, activations[:, h]) for h, (hook, sae) in enumerate(zip(hooks, saes,
                                                                                                       strict=True))]
        return CircuitSetup(model, prompts, sae_rows, hooks, offsets, self._metric(context, settings), groups, status,
                            sites)

    def _circuits(self, context: StageContext, setup: CircuitSetup,
                  groups: Mapping[tuple[str, str], pd.DataFrame]) -> tuple[dict[str, pd.DataFrame],
                                                                           dict[tuple[str, str], NodeEffects]]:
        """Each of `groups`' circuit (its nodes, faithfulness curve and edges), the toxic ones'
        head and MLP patching, and every group's per-prompt node effects."""
        settings: CircuitsConfig = context.config.circuits
        batch_size = context.config.generation.batch_size
        model, hooks, offsets, metric = setup.model, setup.hooks, setup.offsets, setup.metric
        effects: dict[tuple[str, str], NodeEffects] = {}
        node_frames, faith_frames, edge_frames = [], [], []
        for key, group in tqdm(groups.items(), desc="circuits", unit="circuit"):
            kind, category = key
            texts = list(group["text"])
            kind_sites = setup.sites[BASELINE_KIND[kind]]
            gradients = self._gradients(model, texts, hooks, offsets, metric, kind_sites, settings, batch_size)
            effects[key] = node_effects(kind_sites, gradients)
            mean = effects[key].effects.mean(0)
            circuit = ranked_nodes(mean, threshold=settings.node_threshold, max_nodes=settings.max_nodes)
            node_frames.append(self._node_rows(effects[key], circuit, settings, setup.sae_rows).assign(
                kind=kind, category=category))
            sizes = sorted({*settings.faithfulness_sizes, len(circuit)})
            subset = texts[: settings.subset_prompts]  # the costly measurements: a pass per size or node
            curve = faithfulness_curve(model, subset, kind_sites, offsets,
                                       ranked_nodes(mean), sizes, metric, batch_size=batch_size)
            faith_frames.append(pd.DataFrame({
                "kind": kind, "category": category, "n_nodes": curve.n_nodes, "metric": curve.metric,
                "faithfulness": curve.faithfulness, "metric_full": curve.full, "metric_empty": curve.empty,
                "is_circuit": curve.n_nodes == len(circuit)}))
            edges = self._edges(model, subset, kind_sites, offsets, gradients.gradients[: len(subset)],
                                effects[key], circuit[: settings.edge_nodes], batch_size)
            edge_frames.append(edges[edges["effect"].abs() >= settings.edge_threshold].assign(kind=kind,
                                                                                               category=category))
        tables = {
            "circuit_nodes": _concat(node_frames),
            "circuit_faithfulness": _concat(faith_frames),
            "circuit_edges": _concat(edge_frames),
            "circuit_components": self._components(model, setup.prompts, groups, effects, offsets, metric, settings,
                                                   batch_size),
        }
        return tables, effects

    def _output(self, context: StageContext, setup: CircuitSetup, tables: Mapping[str, pd.DataFrame],
                effects: dict[tuple[str, str], NodeEffects]) -> StageOutput:
        """Every circuit's tables, compared: similarity, reliability, verdicts and the shared core."""
        settings: CircuitsConfig = context.config.circuits
        effects = {key: effects[key] for key in setup.groups}  # one order, however the groups were computed
        faithfulness = tables["circuit_faithfulness"]
        similarity, reliability, verdicts, core = self._compare(effects, settings)
        summary = pd.DataFrame(setup.status).merge(reliability, on=["kind", "category"], how="left").merge(
            faithfulness.query("is_circuit")[["kind", "category", "n_nodes", "faithfulness", "metric_full",
                                              "metric_empty"]], on=["kind", "category"], how="left")
        for row in summary.query("status == 'ok' and kind == 'toxic'").itertuples():
            logger.info("circuit toxic/%s: %d nodes keep %.0f%% of the metric", row.category, row.n_nodes,
                        100 * row.faithfulness)
        for row in verdicts.itertuples():
            logger.info("verdict (%s): %s: %s", row.kind, row.label, row.reason)
        return StageOutput(
            tables={
                "circuits": summary.assign(metric_name=settings.metric, method=settings.method),
                **tables,
                "circuit_similarity": similarity,
                "circuit_verdicts": verdicts,
                "circuit_core": core,
            },
            models=(context.config.models[settings.model],),
        )

    def run(self, context: StageContext) -> StageOutput:
        setup = self._setup(context)
        return self._output(context, setup, *self._circuits(context, setup, setup.groups))

    def run_shard(self, context: ShardContext, shard: ShardSpec, current: ShardRound) -> dict[str, pd.DataFrame]:
        """The circuits of the (kind, category) groups in the shard, with their per-prompt node effects."""
        setup = self._setup(context)
        keys = list(setup.groups)
        mine = in_shard(pd.Series([f"{kind}/{category}" for kind, category in keys]), shard)
        tables, effects = self._circuits(context, setup, {key: setup.groups[key] for key, m in zip(keys, mine) if m})
        rows = [pd.DataFrame({"kind": kind, "category": category, "prompt": np.arange(len(value.metric)),
                              "metric": value.metric, "effects": list(value.effects.astype(np.float32))})
                for (kind, category), value in effects.items()]
        return {**tables, "node_effects": _concat(rows)}

    def merge_shards(self, context: StageContext, tables: Mapping[str, pd.DataFrame],
                     current: ShardRound) -> StageOutput:
        setup = self._setup(context)
        effects = {}
        for (kind, category), rows in tables["node_effects"].groupby(["kind", "category"]):
            rows = rows.sort_values("prompt")
            effects[(kind, category)] = NodeEffects(node_table(setup.sites[BASELINE_KIND[kind]]),
                                                    np.stack(rows["effects"].to_numpy()), rows["metric"].to_numpy())
        if missing := sorted(set(setup.groups) - set(effects)):
            raise ExplorerError(f"The circuits shards hold no node effects for {missing}.",
                                "run every shard with the same config and N, then merge again.")
        # Each group's rows in the group order one unsharded run makes them (stable within a group).
        per_group = {name: frame.sort_values([c for c in ("kind", "category") if c in frame], kind="stable")
                     .reset_index(drop=True) for name, frame in tables.items() if name != "node_effects"}
        return self._output(context, setup, per_group, effects)

    @staticmethod
    def _gradients(model: LoadedModel, texts: list[str], hooks: list[str], offsets, metric: RefusalMetric,
                   sites: list[SaeSite], settings: CircuitsConfig, batch_size: int):
        gradient_batch = max(1, batch_size // 4)  # a backward pass holds every layer's activations
        if settings.method == "attribution":
            return metric_gradients(model, texts, hooks, offsets, metric, batch_size=gradient_batch)
        baseline = np.stack([site.baseline_activation() for site in sites])
        return integrated_gradients(model, texts, hooks, offsets, metric, baseline, steps=settings.ig_steps,
                                    batch_size=gradient_batch)

    @staticmethod
    def _node_rows(effects: NodeEffects, circuit: np.ndarray, settings: CircuitsConfig,
                   sae_rows: list[dict[str, Any]]) -> pd.DataFrame:
        """The top `stored_nodes` nodes with mean effect, standard error and whether in the circuit."""
        values = effects.effects
        mean = values.mean(0)
        top = ranked_nodes(mean, max_nodes=settings.stored_nodes)
        layers = {row["hook"]: row["layer"] for row in sae_rows}
        table = effects.nodes.iloc[top].reset_index(drop=True)
        return table.assign(
            layer=table["hook"].map(layers), node=top, rank=np.arange(len(top)), effect=mean[top],
            effect_se=values[:, top].std(0, ddof=1) / np.sqrt(len(values)),
            share_positive=(values[:, top] > 0).mean(0), in_circuit=np.isin(top, circuit),
            n_prompts=len(values))

    @staticmethod
    def _edges(model: LoadedModel, texts: list[str], sites: list[SaeSite], offsets, gradients: np.ndarray,
               effects: NodeEffects, circuit: np.ndarray, batch_size: int) -> pd.DataFrame:
        """Edges between the circuit's nodes at each pair of consecutive SAE'd hooks, on `texts`
        with their metric gradients [n, n_hooks, n_offsets, d_in]."""
        in_circuit = effects.nodes.iloc[circuit]
        frames = []
        for h in range(len(sites) - 1):
            up = in_circuit.loc[in_circuit["hook"] == sites[h].hook, "feature"].astype(int).tolist()
            down = in_circuit.loc[in_circuit["hook"] == sites[h + 1].hook, "feature"].astype(int).tolist()
            if not up or not down:
                continue
            matrix = edge_effects(model, texts, sites[h], sites[h + 1], offsets, gradients[:, h + 1],
                                  up, down, batch_size=max(1, batch_size // 4))
            d, u = np.meshgrid(np.arange(len(down)), np.arange(len(up)), indexing="ij")
            frames.append(pd.DataFrame({
                "upstream_hook": sites[h].hook, "upstream_feature": np.asarray(up)[u.ravel()],
                "downstream_hook": sites[h + 1].hook, "downstream_feature": np.asarray(down)[d.ravel()],
                "effect": matrix.ravel()}))
        columns = ["upstream_hook", "upstream_feature", "downstream_hook", "downstream_feature", "effect"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)

    @staticmethod
    def _compare(effects: dict[tuple[str, str], NodeEffects], settings: CircuitsConfig):
        """Similarity of every pair of circuits, split-half reliability, and a verdict and shared
        core per kind."""
        circuits = {key: value.effects for key, value in effects.items()}
        size = settings.max_nodes
        similarity = pairwise_similarity(circuits, size, n_boot=settings.bootstrap, seed=settings.seed)
        similarity[["kind_a", "category_a"]] = pd.DataFrame(similarity["a"].tolist(), index=similarity.index)
        similarity[["kind_b", "category_b"]] = pd.DataFrame(similarity["b"].tolist(), index=similarity.index)
        similarity = similarity.drop(columns=["a", "b"])
        same_kind = similarity["kind_a"] == similarity["kind_b"]
        similarity["p_value"] = [
            permutation_p([circuits[(row.kind_a, row.category_a)], circuits[(row.kind_b, row.category_b)]],
                          n_permutations=settings.permutations, seed=settings.seed) if same else np.nan
            for row, same in zip(similarity.itertuples(), same_kind, strict=True)]
        halves = {key: split_half(values, size, n_splits=settings.split_halves, seed=settings.seed)
                  for key, values in circuits.items()}
        reliability = pd.DataFrame([{"kind": kind, "category": category, "split_half_cosine": half.cosine,
                                     "split_half_jaccard": half.jaccard, "ceiling": half.cosine_full}
                                    for (kind, category), half in halves.items()])
        verdict_rows, core_frames = [], []
        nodes = next(iter(effects.values())).nodes
        for kind in settings.kinds:
            keys = [key for key in circuits if key[0] == kind]
            if len(keys) < 2:
                logger.warning("Fewer than two %s circuits: no %s verdict.", kind, kind)
                continue
            pairs = similarity[same_kind & (similarity["kind_a"] == kind)]
            p_value = permutation_p([circuits[key] for key in keys], n_permutations=settings.permutations,
                                    seed=settings.seed)
            ceiling = float(np.mean([halves[key].cosine_full for key in keys]))
            result = verdict(pairs, ceiling, p_value, alpha=settings.alpha,
                             monolithic_ratio=settings.monolithic_ratio, modular_ratio=settings.modular_ratio)
            sets = {key[1]: ranked_nodes(circuits[key].mean(0), threshold=settings.node_threshold,
                                         max_nodes=size) for key in keys}
            core = shared_core(sets, settings.core_share)
            mean_effects = np.stack([circuits[key].mean(0) for key in keys])
            core = core.assign(kind=kind, hook=nodes["hook"].to_numpy()[core["node"]],
                               feature=nodes["feature"].to_numpy()[core["node"]],
                               mean_effect=mean_effects[:, core["node"]].mean(0),
                               categories=[[c for c, s in sets.items() if node in s] for node in core["node"]])
            core_frames.append(core)
            verdict_rows.append({
                "kind": kind, **result.__dict__, "n_categories": len(keys),
                "mean_jaccard": float(pairs["jaccard"].mean()), "jaccard_low": float(pairs["jaccard_low"].mean()),
                "jaccard_high": float(pairs["jaccard_high"].mean()), "core_size": int(core["in_core"].sum()),
                "circuit_size": size, "alpha": settings.alpha, "monolithic_ratio": settings.monolithic_ratio,
                "modular_ratio": settings.modular_ratio, "permutations": settings.permutations})
        return similarity, reliability, pd.DataFrame(verdict_rows), pd.concat(core_frames, ignore_index=True)

    @staticmethod
    def _components(model: LoadedModel, prompts: pd.DataFrame, groups, effects, offsets,
                    metric: RefusalMetric, settings: CircuitsConfig, batch_size: int) -> pd.DataFrame:
        """Toxic -> safe patching of every layer's attention and MLP output and every head by
        attribution, the `exact_sites` strongest per category re-checked exactly, for every category
        with a toxic circuit."""
        toxic_groups = [(category, group) for (kind, category), group in groups.items() if kind == "toxic"]
        if not toxic_groups:
            return pd.DataFrame()
        rng = np.random.default_rng(settings.seed + 1)
        safe_texts = prompts.loc[prompts["kind"] == "safe", "text"].to_numpy()
        receivers = list(safe_texts[rng.choice(len(safe_texts), min(len(safe_texts), settings.patch_prompts),
                                               replace=False)])
        gradient_batch = max(1, batch_size // 4)
        families = {  # name: (hooks, the axes attribution sums over: positions and features)
            "layers": (layer_sites(model.n_layers), (2, 3)),
            "heads": (head_sites(model.n_layers), (2, 4)),
        }
        receiver = {name: metric_gradients(model, receivers, hooks, offsets, metric, batch_size=gradient_batch,
                                           desc=f"{name} gradients") for name, (hooks, _) in families.items()}
        safe = float(receiver["layers"].metric.mean())
        rows = []
        for category, group in tqdm(toxic_groups, desc="head/MLP patching", unit="category"):
            donors = list(group["text"])[: settings.patch_prompts]
            toxic = float(effects[("toxic", category)].metric.mean())
            base = {"category": category, "n_prompts": len(donors), "n_receivers": len(receivers),
                    "metric_safe": safe, "metric_toxic": toxic}
            candidates = []  # (|share|, hook, head, donor value) for the exact re-check
            for name, (hooks, axes) in families.items():
                donor = capture(model, donors, hooks, offsets, batch_size=batch_size, desc=f"toxic {name}").mean(0)
                share = patching_attribution(receiver[name].activations, receiver[name].gradients, donor,
                                             axes) / (toxic - safe)  # an estimated change, as a share of the gap
                for index in np.ndindex(share.shape):
                    site = index[0]
                    layer = site // 2 if name == "layers" else site  # layer sites alternate attn, mlp
                    component = ("mlp" if "mlp" in hooks[site] else "attn") if name == "layers" else "head"
                    head = int(index[1]) if name == "heads" else -1
                    rows.append({**base, "component": component, "layer": int(layer), "head": head,
                                 "method": "attribution", "hook": hooks[site], "effect": float(share[index])})
                    value = donor[site][:, head] if name == "heads" else donor[site]
                    candidates.append((abs(float(share[index])), component, int(layer), head, hooks[site], value))
            for _, component, layer, head, hook, value in sorted(candidates, key=lambda c: -c[0])[
                    : settings.exact_sites]:
                patched = patched_metric(model, receivers, hook, offsets, value, metric, batch_size=batch_size,
                                         head=None if head < 0 else head)
                rows.append({**base, "component": component, "layer": layer, "head": head, "method": "exact",
                             "hook": hook, "effect": float(gap_share(patched, safe, toxic))})
        return pd.DataFrame(rows)
