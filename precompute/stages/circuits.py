"""Stage `circuits`: a sparse feature circuit per harm category and kind, and how alike they are.

1. Node effects (attribution patching or integrated gradients) of every SAE feature and error term
   at the `saes` stage's hooks, per prompt, for each category's toxic, hard and safe prompts.
   Toxic and hard prompts are patched towards the mean safe prompt; safe prompts towards the mean
   toxic prompt (which nodes keep a safe prompt from being refused).
2. The circuit: the top nodes by |mean effect|; its faithfulness under mean ablation of everything
   else, as a curve over sizes; edges between its nodes at consecutive SAE'd hooks.
3. Head and MLP patching, toxic -> safe, per category.
4. Comparison, on SAE feature nodes (error nodes' share reported apart): cosine, centred cosine and
   Jaccard for every pair of circuits with bootstrap CIs and Holm-corrected permutation p-values;
   per kind the verdict (engine.circuits.verdict: joint bootstrap of the ratio to the within-category
   ceiling, permutation test, equivalence bands), category decodability, the rule's calibration on
   planted effects at the study's own sizes and noise (engine.circuits.calibration), and the shared core.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar, cast

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits  # a scikit-learn dependency
from tqdm.auto import tqdm

from engine.circuits.attribution import integrated_gradients, metric_gradients
from engine.circuits.calibration import (
    POWER,
    calibrate,
    decisive_scale,
    planted_study,
    smallest_detectable_share,
)
from engine.circuits.components import (
    gap_share,
    head_sites,
    layer_sites,
    patched_metric,
    patching_attribution,
)
from engine.circuits.decodability import category_decodability
from engine.circuits.discovery import (
    ERROR,
    NodeEffects,
    SaeSite,
    edge_effects,
    faithfulness_curve,
    node_effects,
    node_table,
    sae_site,
)
from engine.circuits.refusal_metric import RefusalMetric, compliance_token_ids
from engine.circuits.similarity import (
    check_sample_size,
    error_share,
    pairwise_similarity,
    ranked_nodes,
    reliability,
    seeds_label,
    shared_core,
    split_half,
)
from engine.circuits.verdict import Estimate, Rule, assess, grouped, pairwise_p
from engine.data.store import rows_of
from engine.errors import ExplorerError
from engine.judging.judge import refusal_token_ids
from engine.runtime.activations import capture, prompt_end_positions
from engine.runtime.models import LoadedModel
from engine.saes.training import load_sae, stored_sae_source
from precompute.config import CircuitsConfig
from precompute.pipeline import ShardContext, ShardRound, StageContext, StageOutput
from precompute.shards import ShardSpec, in_shard
from precompute.stages.section import ModelSectionStage

logger = logging.getLogger(__name__)

BASELINE_KIND = {"toxic": "safe", "hard": "safe", "safe": "toxic"}  # what each kind is patched towards


def ranking_rows(n_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """A group's prompts split in two alternating halves (the group is already a seeded sample):
    the first ranks the nodes, the second measures the circuit they make."""
    rows = np.arange(n_prompts)
    return rows[0::2], rows[1::2]


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The frames as one (none: an empty table, e.g. a shard without circuits)."""
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _estimate(name: str, estimate: Estimate) -> dict[str, float]:
    """A verdict table's columns for one estimate: the value and its interval."""
    return {name: estimate.value, f"{name}_low": estimate.low, f"{name}_high": estimate.high}


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
    version = 3
    upstream = ("prompts", "generate", "saes")
    # Sharded by (kind, category) group: each shard finds its groups' circuits and keeps their
    # per-prompt node effects; the merge compares every pair.
    shardable = True
    shard_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "node_effects": ("kind", "category", "prompt"), "circuit_nodes": ("kind", "category", "node"),
        "circuit_faithfulness": ("kind", "category", "n_nodes"),
        "circuit_prompts": ("kind", "category", "prompt_id")}


    @staticmethod
    def _metric(context: StageContext, settings: CircuitsConfig) -> RefusalMetric:
        refusal = tuple(refusal_token_ids(context.table("refusal_tokens"), settings.model))
        answers = context.table("generations").query("model == @settings.model and condition == 'baseline'")
        compliance = compliance_token_ids(answers["first_token_id"].tolist(), answers["refused"].tolist(), refusal)
        return RefusalMetric(settings.metric, refusal, compliance if settings.metric == "logit_diff" else ())

    @staticmethod
    def _groups(prompts: pd.DataFrame, settings: CircuitsConfig, trained_on: set[str]) -> tuple[
            dict[tuple[str, str], pd.DataFrame], list[dict[str, Any]]]:
        """Each (kind, category)'s prompts (a seeded sample of at most max_prompts, none the fine-tune
        trained on: a model's answer to its own training prompt measures memory, not mechanism), and a
        status row per group saying whether it has enough prompts for the statistics."""
        rng = np.random.default_rng(settings.seed)
        groups, status = {}, []
        for (kind, category), group in prompts.groupby(["kind", "category"], sort=True):
            if kind not in settings.kinds:
                continue
            trained = group["id"].isin(trained_on).to_numpy()
            group = group[~trained]
            if len(group) > settings.max_prompts:
                group = group.iloc[np.sort(rng.choice(len(group), settings.max_prompts, replace=False))]
            row = {"kind": kind, "category": category, "n_prompts": len(group), "n_trained_on": int(trained.sum())}
            try:
                check_sample_size(f"{kind}/{category}", len(group), settings.min_prompts)
            except ExplorerError as error:
                logger.warning("%s", error)
                status.append(row | {"status": "skipped", "message": str(error)})
                continue
            groups[(kind, category)] = group
            status.append(row | {"status": "ok", "message": ""})
        return groups, status

    def _setup(self, context: StageContext) -> CircuitSetup:
        """The model, its SAEs, the metric, the prompt groups and their baselines."""
        config = context.config
        settings = config.circuits
        assert settings is not None  # applies() guarantees it
        model = config.generation.load(config.models[settings.model])
        prompts = context.table("prompts").drop(columns="run_id").reset_index(drop=True)
        # Keyed by column name (pandas-stubs say any hashable).
        sae_rows = cast(list[dict[str, Any]], context.table("saes").sort_values("layer").to_dict("records"))
        hooks = [row["hook"] for row in sae_rows]
        saes = [load_sae(*stored_sae_source(config.store, row), device=model.device) for row in sae_rows]
        offsets = prompt_end_positions(model.tokenizer).offsets
        trained_on = set(context.table("tune_data")["prompt_id"]) if "tune_data" in context.available else set()
        groups, status = self._groups(prompts, settings, trained_on)
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
        settings = context.config.circuits
        assert settings is not None  # applies() guarantees it
        batch_size = context.config.generation.batch_size
        model, hooks, offsets, metric = setup.model, setup.hooks, setup.offsets, setup.metric
        effects: dict[tuple[str, str], NodeEffects] = {}
        node_frames, faith_frames, edge_frames, prompt_frames = [], [], [], []
        for key, group in tqdm(groups.items(), desc="circuits", unit="circuit"):
            kind, category = key
            texts = list(group["text"])
            kind_sites = setup.sites[BASELINE_KIND[kind]]
            gradients = self._gradients(model, texts, hooks, offsets, metric, kind_sites, settings, batch_size)
            effects[key] = node_effects(kind_sites, gradients)
            # Nodes are ranked on half the prompts and measured (faithfulness, edges) on the others.
            ranking, measured = ranking_rows(len(texts))
            mean = effects[key].effects[ranking].mean(0)
            circuit = ranked_nodes(mean, threshold=settings.node_threshold, max_nodes=settings.max_nodes)
            node_frames.append(self._node_rows(effects[key], ranking, circuit, settings, setup.sae_rows).assign(
                kind=kind, category=category))
            sizes = sorted({*settings.faithfulness_sizes, len(circuit)})
            part = np.full(len(texts), "held_out", dtype=object)
            measured = measured[: settings.subset_prompts]  # the costly measurements: a pass per size or node
            part[ranking], part[measured] = "ranking", "measured"
            prompt_frames.append(pd.DataFrame({"kind": kind, "category": category,
                                               "prompt_id": group["id"].to_numpy(), "part": part}))
            subset = [texts[i] for i in measured]
            curve = faithfulness_curve(model, subset, kind_sites, offsets,
                                       ranked_nodes(mean), sizes, metric, batch_size=batch_size)
            faith_frames.append(pd.DataFrame({
                "kind": kind, "category": category, "n_nodes": curve.n_nodes, "metric": curve.metric,
                "faithfulness": curve.faithfulness, "metric_full": curve.full, "metric_empty": curve.empty,
                "is_circuit": curve.n_nodes == len(circuit), "n_prompts": len(subset)}))
            edges = self._edges(model, subset, kind_sites, offsets, gradients.gradients[measured],
                                effects[key], circuit[: settings.edge_nodes], batch_size)
            edge_frames.append(edges[edges["effect"].abs() >= settings.edge_threshold].assign(kind=kind,
                                                                                               category=category))
        tables = {
            "circuit_nodes": _concat(node_frames),
            "circuit_faithfulness": _concat(faith_frames),
            "circuit_edges": _concat(edge_frames),
            "circuit_prompts": _concat(prompt_frames),  # which prompts ranked the nodes, which measured them
            "circuit_components": self._components(model, setup.prompts, groups, effects, offsets, metric, settings,
                                                   batch_size),
        }
        return tables, effects

    def _output(self, context: StageContext, setup: CircuitSetup, tables: Mapping[str, pd.DataFrame],
                effects: dict[tuple[str, str], NodeEffects]) -> StageOutput:
        """Every circuit's tables, compared: similarity, reliability, verdicts and the shared core."""
        settings = context.config.circuits
        assert settings is not None  # applies() guarantees it
        effects = {key: effects[key] for key in setup.groups}  # one order, however the groups were computed
        faithfulness = tables["circuit_faithfulness"]
        similarity, per_circuit, verdicts, core, calibration = self._compare(effects, settings)
        summary = pd.DataFrame(setup.status).merge(per_circuit, on=["kind", "category"], how="left").merge(
            faithfulness.query("is_circuit")[["kind", "category", "n_nodes", "faithfulness", "metric_full",
                                              "metric_empty"]], on=["kind", "category"], how="left")
        for row in rows_of(summary.query("status == 'ok' and kind == 'toxic'")):
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
                "circuit_calibration": calibration,
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
            effects[(kind, category)] = NodeEffects(node_table(setup.sites[BASELINE_KIND[str(kind)]]),
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
    def _node_rows(effects: NodeEffects, ranking: np.ndarray, circuit: np.ndarray, settings: CircuitsConfig,
                   sae_rows: list[dict[str, Any]]) -> pd.DataFrame:
        """The top `stored_nodes` nodes by mean effect on the `ranking` prompts, with its standard
        error, whether in the circuit, and the mean effect on the other prompts (does the rank hold?)."""
        values = effects.effects[ranking]
        held_out = np.delete(effects.effects, ranking, axis=0)
        mean = values.mean(0)
        top = ranked_nodes(mean, max_nodes=settings.stored_nodes)
        layers = {row["hook"]: row["layer"] for row in sae_rows}
        table = effects.nodes.iloc[top].reset_index(drop=True)
        return table.assign(
            layer=table["hook"].map(layers), node=top, rank=np.arange(len(top)), effect=mean[top],
            effect_se=values[:, top].std(0, ddof=1) / np.sqrt(len(values)),
            share_positive=(values[:, top] > 0).mean(0), in_circuit=np.isin(top, circuit),
            n_prompts=len(values), effect_held_out=held_out[:, top].mean(0), n_held_out=len(held_out))

    @staticmethod
    def _edges(model: LoadedModel, texts: list[str], sites: list[SaeSite], offsets, gradients: np.ndarray,
               effects: NodeEffects, circuit: np.ndarray, batch_size: int) -> pd.DataFrame:
        """Edges between the circuit's nodes at each pair of consecutive SAE'd hooks, on `texts`
        with their metric gradients [n, n_hooks, n_offsets, d_in]."""
        in_circuit = effects.nodes.iloc[circuit]
        frames: list[pd.DataFrame] = []
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
        """Similarity of every pair of circuits, each circuit's reliability and error share, and per
        kind the verdict, its calibration and the shared core. Circuits are compared on their SAE
        feature nodes; error nodes (x - x_hat, one per SAE, often the largest entries) stay in the
        circuits and the core but out of the compared vectors."""
        nodes = next(iter(effects.values())).nodes
        is_error = (nodes["feature"] == ERROR).to_numpy()
        circuits = {key: value.effects for key, value in effects.items()}
        features = {key: values[:, ~is_error] for key, values in circuits.items()}
        size = settings.max_nodes
        similarity = pairwise_similarity(features, size, n_boot=settings.bootstrap, seed=settings.seed)
        similarity[["kind_a", "category_a"]] = pd.DataFrame(similarity["a"].tolist(), index=similarity.index)
        similarity[["kind_b", "category_b"]] = pd.DataFrame(similarity["b"].tolist(), index=similarity.index)
        similarity = similarity.drop(columns=["a", "b"])
        halves = {key: split_half(values, size, n_splits=settings.split_halves, seed=settings.seed)
                  for key, values in features.items()}
        per_circuit = pd.DataFrame([{
            "kind": kind, "category": category, "split_half_cosine": halves[(kind, category)].cosine,
            "split_half_jaccard": halves[(kind, category)].jaccard,
            "ceiling": reliability(features[(kind, category)]),
            "error_share": error_share(circuits[(kind, category)].mean(0), is_error),
        } for kind, category in circuits])
        rule = Rule(alpha=settings.alpha, monolithic_ratio=settings.monolithic_ratio,
                    modular_ratio=settings.modular_ratio, n_boot=settings.bootstrap,
                    n_permutations=settings.permutations)
        verdict_rows, core_frames, centred_frames, calibration_frames = [], [], [], []
        pair_frames: list[pd.DataFrame] = []
        for kind in settings.kinds:
            keys = [key for key in circuits if key[0] == kind]
            if len(keys) < 2:
                logger.warning("Fewer than two %s circuits: no %s verdict.", kind, kind)
                continue
            categories = [category for _, category in keys]
            with threadpool_limits(limits=1, user_api="blas"):  # small matrices: extra BLAS threads only spin
                row, pairs, centred, calibration = CircuitsStage._kind_verdict([features[key] for key in keys], rule,
                                                                              settings)
            pairs[["category_a", "category_b"]] = np.asarray(categories)[pairs[["a", "b"]].to_numpy()]
            pair_frames.append(pairs.drop(columns=["a", "b"]).assign(kind_a=kind, kind_b=kind))
            centred_frames.append(pd.DataFrame({"kind": kind, "category": categories,
                                                "split_half_centred": centred}))
            calibration_frames.append(calibration.assign(kind=kind))
            same = (similarity["kind_a"] == kind) & (similarity["kind_b"] == kind)
            core = CircuitsStage._core(kind, {key[1]: circuits[key] for key in keys}, nodes, settings)
            core_frames.append(core)
            verdict_rows.append({
                "kind": kind, **row, "n_categories": len(keys),
                "prompts_per_category": min(len(features[key]) for key in keys),
                "mean_jaccard": float(similarity.loc[same, "jaccard"].mean()),
                "jaccard_split_half": float(np.mean([halves[key].jaccard for key in keys])),
                "error_share": float(per_circuit.loc[per_circuit["kind"] == kind, "error_share"].mean()),
                "core_size": int(core["in_core"].sum()), "circuit_size": size, "alpha": settings.alpha,
                "monolithic_ratio": settings.monolithic_ratio, "modular_ratio": settings.modular_ratio,
                "permutations": settings.permutations, "bootstrap": settings.bootstrap})
        similarity = similarity.merge(pd.concat(pair_frames, ignore_index=True) if pair_frames else pd.DataFrame(
            columns=["kind_a", "category_a", "kind_b", "category_b"]), how="left",
            on=["kind_a", "category_a", "kind_b", "category_b"])
        per_circuit = per_circuit.merge(_concat(centred_frames) if centred_frames else pd.DataFrame(
            columns=["kind", "category", "split_half_centred"]), on=["kind", "category"], how="left")
        return (similarity, per_circuit, pd.DataFrame(verdict_rows), _concat(core_frames),
                _concat(calibration_frames))

    @staticmethod
    def _kind_verdict(groups: list[np.ndarray], rule: Rule, settings: CircuitsConfig) -> tuple[
            dict[str, Any], pd.DataFrame, np.ndarray, pd.DataFrame]:
        """One kind's verdict row, its pairs' centred cosines and corrected p-values, its categories'
        centred reliability, and its calibration table."""
        data = grouped(groups)
        decision = assess(data, rule, seed=settings.seed)
        pairs = decision.interval.pairs.drop(columns="cosine").merge(
            pairwise_p(data, n_permutations=settings.permutations, seed=settings.seed).rename(
                columns={"p_corrected": "p_holm"}), on=["a", "b"])
        decoding = category_decodability(data, folds=settings.decoding_folds,
                                         n_permutations=settings.decoding_permutations, seed=settings.seed)
        started = time.perf_counter()
        study = planted_study(groups, seed=settings.seed)
        simulated = replace(rule, n_permutations=settings.calibration_permutations)
        calibration = calibrate(study, simulated, shares=settings.calibration_shares,
                                n_simulations=settings.calibration_simulations, seed=settings.seed).assign(purpose="grid")
        reason, decisive = decision.reason, float("nan")
        if decision.label == "inconclusive" and settings.calibration_scales:
            share = float(np.clip(decision.interval.category_share.value, 0, 1))
            rows, scale = decisive_scale(study, simulated, share=share, scales=settings.calibration_scales,
                                         n_simulations=settings.calibration_simulations, seed=settings.seed)
            calibration = pd.concat([calibration, rows.assign(purpose="sample size")], ignore_index=True)
            reason += CircuitsStage._sample_size_note(share, min(data.sizes), scale, settings)
            decisive = float(min(data.sizes) * scale) if scale else float("nan")
        logger.info("calibration: %d simulated studies in %.1f s", len(calibration) * settings.calibration_simulations,
                    time.perf_counter() - started)
        at_zero = calibration[(calibration["purpose"] == "grid") & (calibration["share"] == 0)]
        interval = decision.interval
        row = {
            "label": decision.label, "reason": reason, "p_value": decision.p_value,
            "between": interval.between, "ceiling": interval.ceiling, **_estimate("ratio", interval.ratio),
            **_estimate("category_share", interval.category_share), "centred_between": interval.centred_between,
            "centred_within": interval.centred_within, "seeds_label": seeds_label(interval.between),
            "decoding_accuracy": decoding.accuracy, "decoding_chance": decoding.chance,
            "decoding_null": decoding.null_mean, "decoding_null_high": decoding.null_high,
            "decoding_p": decoding.p_value, "decoding_folds": decoding.folds,
            "detectable_share": smallest_detectable_share(calibration[calibration["purpose"] == "grid"]),
            "false_modular": float(at_zero["modular"].iloc[0]) if len(at_zero) else float("nan"),
            "decisive_prompts": decisive, "largest_share": max(settings.calibration_shares),
            "calibration_simulations": settings.calibration_simulations,
        }
        return row, pairs, interval.centred_reliability, calibration

    @staticmethod
    def _sample_size_note(share: float, prompts: int, scale: int | None, settings: CircuitsConfig) -> str:
        """Why more prompts would (or would not) settle an inconclusive verdict, from the calibration."""
        simulated = f"; in simulations at this study's noise and its estimated category share (q = {share:.2f}), "
        if scale is None:
            return (f"{simulated}even {prompts * max(settings.calibration_scales)} prompts per category do not "
                    f"decide it in {POWER:.0%} of them")
        return f"{simulated}{prompts * scale} prompts per category would decide it in {POWER:.0%} of them"

    @staticmethod
    def _core(kind: str, circuits: Mapping[str, np.ndarray], nodes: pd.DataFrame,
              settings: CircuitsConfig) -> pd.DataFrame:
        """A kind's shared core over its categories' circuits (every node, error nodes included)."""
        sets = {category: ranked_nodes(values.mean(0), threshold=settings.node_threshold, max_nodes=settings.max_nodes)
                for category, values in circuits.items()}
        core = shared_core(sets, settings.core_share)
        mean_effects = np.stack([values.mean(0) for values in circuits.values()])
        return core.assign(kind=kind, hook=nodes["hook"].to_numpy()[core["node"]],
                           feature=nodes["feature"].to_numpy()[core["node"]],
                           mean_effect=mean_effects[:, core["node"]].mean(0),
                           # A column of lists, which pandas-stubs do not allow for.
                           categories=cast(list[Any], [[c for c, s in sets.items() if node in s]
                                                       for node in core["node"]]))

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
