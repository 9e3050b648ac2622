"""Stage `directions`: refusal directions per layer and category, chosen and tested causally.

1. Capture the residual stream (`blocks.{l}.hook_resid_pre`) at the prompt-end positions into
   running sums per prompt group, for every model: no prompt's activations are kept.
2. Candidates: difference of means, toxic minus safe, on the train split minus a validation
   part, for every (layer, position): one global set and one per category. As in Arditi et al.
   (2024), the means are over the toxic prompts the studied model refuses and the safe ones it
   does not, by its refusal score (`filter_by_refusal`); every model's over the same prompts.
3. Score candidates on the validation part (filtered the same way, by the studied model) and
   choose one (Arditi et al. 2024); the other models' direction is their own difference of means
   at the chosen site (no search).
4. Test it on the test split, per prompt: generation with the direction ablated (toxic, hard) and
   added (safe, hard); KL and completion cross-entropy on safe prompts; the cross-ablation scores
   (ablate category k's direction, read category j's refusal score).
5. Geometry, from captures at the chosen position only (every layer for the toxic and safe
   prompts, streamed to a scratch file removed afterwards; the chosen layer for every prompt):
   separation and probe accuracy per layer for every model, projections, category cosines with
   bootstrap intervals, a refused-vs-answered direction from hard prompts, and the surface-form
   probe (engine.directions.form_probe: is the refusal direction a phrasing detector?).

Sharded, it runs in two rounds: shards add up step 1 over their prompts and the merge does steps
2-3 (`select`); then shards do step 4 on their test prompts and the merge aggregates them and does
step 5 (`evaluate`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import pandas as pd
import torch

from engine.data.prompts import NO_CATEGORY, UNCATEGORIZED, direction_validation
from engine.directions.extraction import (
    GroupSums,
    SelectionRule,
    bootstrap_cosines,
    cross_ablation_specificity,
    hard_prompt_direction,
    layer_separation,
    refusal_filter,
    select_candidate,
    unit,
)
from engine.directions.form_probe import form_probe
from engine.directions.scoring import (
    direction_effects,
    harmlessness_table,
    refusal_scores_under_ablation,
    score_candidates,
)
from engine.errors import ExplorerError
from engine.judging.judge import refusal_rate_table, refusal_token_ids
from engine.runtime.activations import capture, prompt_end_positions
from engine.runtime.models import LoadedModel
from precompute.config import StudyConfig
from precompute.pipeline import ShardContext, ShardRound, Stage, StageContext, StageOutput
from precompute.shards import ShardSpec, in_shard
from precompute.stages.generate import model_fingerprint

logger = logging.getLogger(__name__)


def category_cosine_variants(site: np.ndarray, instruction_end: np.ndarray, split: PromptSplit,
                             global_direction: np.ndarray, position_label: str, *, n_boot: int,
                             seed: int) -> pd.DataFrame:
    """The category directions' cosines (fit split, bootstrap intervals) four ways, one `variant`
    each: toxic minus safe at the chosen position (refusal), the same with the global refusal
    direction projected out (what categories share beyond it), toxic minus hard (harm, not
    phrasing that sounds harmful) and toxic minus safe at the last instruction token (harm
    recognition, Zhao et al. 2025). `site` and `instruction_end` [n_prompts, d] at the chosen layer."""
    category = split.prompts["category"].to_numpy()
    kind = split.prompts["kind"].to_numpy()
    fit = split.fit
    groups = np.where(split.toxic & fit, category, "")
    variants = [
        (f"toxic - safe at {position_label}", site, split.safe & fit, None),
        (f"toxic - safe at {position_label}, global direction removed", site, split.safe & fit, global_direction),
        (f"toxic - hard at {position_label}", site, (kind == "hard") & fit, None),
        ("toxic - safe at the instruction's last token", instruction_end, split.safe & fit, None),
    ]
    frames = [bootstrap_cosines(acts, groups, split.categories, baseline, n_boot=n_boot, seed=seed, remove=remove)
              .assign(variant=name, order=order)
              for order, (name, acts, baseline, remove) in enumerate(variants) if baseline.any()]
    table = pd.concat(frames, ignore_index=True)
    return table[["order", "variant", *(c for c in table.columns if c not in ("order", "variant"))]]


@dataclass(frozen=True)
class PromptSplit:
    """Which prompts fit the directions, choose among them (validation) and test them."""

    prompts: pd.DataFrame
    toxic: np.ndarray
    safe: np.ndarray
    fit: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    categories: list[str]  # the studied categories with toxic fit prompts

    def groups(self, *, by_category: bool, kept: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The prompt groups whose activation sums make the candidate directions: toxic and safe fit
        prompts (those in `kept`, if given), and with `by_category` each category's toxic ones (for
        the studied model)."""
        category = self.prompts["category"].to_numpy()
        fit = self.fit if kept is None else self.fit & kept
        return {"toxic": self.toxic & fit, "safe": self.safe & fit} | {
            f"toxic {c}": self.toxic & fit & (category == c) for c in (self.categories if by_category else ())}

    def refusal_kept(self, model: LoadedModel, rows: np.ndarray, token_ids: list[int], *,
                     batch_size: int) -> np.ndarray:
        """Which of the toxic and safe prompts in `rows` pass `refusal_filter` for `model` (a mask
        over all prompts; one forward pass over those rows)."""
        rows = rows & (self.toxic | self.safe)
        scores = np.full(len(self.prompts), np.nan)
        if rows.any():
            scores[rows] = refusal_scores_under_ablation(model, None, list(self.prompts["text"][rows]), token_ids,
                                                         batch_size=batch_size)
        return refusal_filter(self.toxic, self.safe, scores)


@dataclass(frozen=True)
class Selection:
    """The chosen site and the direction tested on each model (round `select`'s result)."""

    tables: Mapping[str, pd.DataFrame]  # direction_candidates, refusal_directions, model_directions

    @property
    def chosen(self) -> pd.Series:
        candidates = self.tables["direction_candidates"]
        return candidates[candidates["chosen"]].iloc[0]

    @property
    def layer(self) -> int:
        return int(self.chosen["layer"])

    @property
    def position(self) -> int:
        return int(self.chosen["position"])

    def vector(self, role: str) -> np.ndarray:
        vectors = self.tables["model_directions"].set_index("model")["vector"]
        return np.asarray(vectors[role], dtype=np.float32)

    def category_directions(self) -> dict[str, np.ndarray]:
        rows = self.tables["refusal_directions"].query("scope != 'global' and chosen")
        return {str(row.scope): np.asarray(row.vector, dtype=np.float32) for row in rows.itertuples()}


class DirectionsStage(Stage):
    name = "directions"
    version = 9
    upstream = ("prompts", "generate")
    shardable = True
    shard_rounds: ClassVar[tuple[str, ...]] = ("select", "evaluate")
    shard_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "evaluated": ("model", "condition", "prompt_id"), "safe_effects": ("model", "prompt_id"),
        "cross_scores": ("ablated", "prompt_id")}

    def applies(self, config: StudyConfig) -> bool:
        return config.directions is not None

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        return {
            "directions": config.section("directions"),
            "models": {role: model_fingerprint(spec) for role, spec in config.models.items()},
            "batch_size": config.generation.batch_size,
            "dtype": config.generation.dtype_name,
        }

    @staticmethod
    def _loader(context: StageContext) -> Callable[[str], LoadedModel]:
        """Each model of the study by role, loaded once per run of the stage."""
        config = context.config
        return cache(lambda role: config.generation.load(config.models[role]))

    def run(self, context: StageContext) -> StageOutput:
        split, load = self._split(context), self._loader(context)
        selection = self._select(context, load, split, self._sums(context, load, split, np.ones(len(split.prompts), bool)))
        effects = self._evaluate(context, load, selection, split.prompts[split.test])
        return self._finish(context, load, split, selection, effects)

    def run_shard(self, context: ShardContext, shard: ShardSpec, current: ShardRound) -> dict[str, pd.DataFrame]:
        split, load = self._split(context), self._loader(context)
        mine = in_shard(split.prompts["id"], shard)
        if current.name == "select":
            return {"partial_sums": self._sums(context, load, split, mine)}
        return self._evaluate(context, load, Selection(current.earlier), split.prompts[split.test & mine])

    def merge_shards(self, context: StageContext, tables: Mapping[str, pd.DataFrame],
                     current: ShardRound) -> StageOutput:
        split, load = self._split(context), self._loader(context)
        if current.name == "select":
            return StageOutput(self._select(context, load, split, tables["partial_sums"]).tables)
        return self._finish(context, load, split, Selection(current.earlier), tables)

    @staticmethod
    def _split(context: StageContext) -> PromptSplit:
        config = context.config
        settings = config.directions
        assert settings is not None  # applies() guarantees it
        prompts = context.table("prompts").drop(columns="run_id").reset_index(drop=True)
        kind, category = prompts["kind"].to_numpy(), prompts["category"].to_numpy()
        toxic = kind == "toxic"
        train = (prompts["split"] == "train").to_numpy()
        validation = train & direction_validation(prompts["text"], settings.validation_fraction)
        fit = train & ~validation
        # The configured categories, else every named category with toxic prompts (in the data's order).
        wanted = (list(config.prompts.categories) if config.prompts.categories is not None
                  else sorted(set(category[toxic]) - {NO_CATEGORY, UNCATEGORIZED}))
        categories = [c for c in wanted if (toxic & fit & (category == c)).any()]
        if empty := sorted(set(wanted) - set(categories)):
            raise ExplorerError(
                f"No toxic training prompts in categor{'y' if len(empty) == 1 else 'ies'} {empty}: "
                "no category direction can be computed.",
                "add toxic prompts for it or drop it from prompts.categories in the config.")
        return PromptSplit(prompts, toxic, kind == "safe", fit, validation, (prompts["split"] == "test").to_numpy(),
                           categories)

    @staticmethod
    def _sums(context: StageContext, load: Callable[[str], LoadedModel], split: PromptSplit,
              rows: np.ndarray) -> pd.DataFrame:
        """Every model's activation sums over each prompt group, at every (layer, position), over
        the prompts in `rows`, as rows (model, group, cell, total): a shard's part of the totals."""
        config = context.config
        settings = config.directions
        assert settings is not None  # applies() guarantees it
        role = settings.model
        frames: list[pd.DataFrame] = []
        # The studied model's refusal filter picks the prompts for every model: the same prompts
        # make each model's direction comparable (a base model may refuse none of them).
        kept = None
        if settings.filter_by_refusal:
            token_ids = refusal_token_ids(context.table("refusal_tokens"), role)
            kept = split.refusal_kept(load(role), rows & split.fit, token_ids, batch_size=config.generation.batch_size)
        for other_role in config.models:
            model = load(other_role)
            positions = prompt_end_positions(model.tokenizer)
            # The studied model's sums make every candidate; the others' only the chosen site's direction.
            groups = split.groups(by_category=other_role == role, kept=kept)
            # Only the prompts some group sums (the fit split's toxic and safe ones, under half).
            summed = rows & np.logical_or.reduce(list(groups.values()))
            texts = list(split.prompts["text"][summed])
            sums = GroupSums({name: mask[summed] for name, mask in groups.items()},
                             (len(texts), model.n_layers, len(positions.offsets), model.d_model))
            capture(model, texts, [f"blocks.{layer}.hook_resid_pre" for layer in range(model.n_layers)],
                    positions.offsets, batch_size=config.generation.batch_size, desc=f"capture {other_role}", out=sums)
            frames.append(sums.partial_sums().assign(model=other_role))
        return pd.concat(frames, ignore_index=True)

    @staticmethod
    def _select(context: StageContext, load: Callable[[str], LoadedModel], split: PromptSplit,
                partial_sums: pd.DataFrame) -> Selection:
        """Candidates from the summed activations, scored on the validation prompts; the chosen one."""
        config = context.config
        settings = config.directions
        assert settings is not None  # applies() guarantees it
        role = settings.model
        batch_size = config.generation.batch_size
        model = load(role)
        positions = prompt_end_positions(model.tokenizer)
        shape = (len(split.prompts), model.n_layers, len(positions.offsets), model.d_model)

        def summed(model_role: str, groups: Mapping[str, np.ndarray]) -> GroupSums:
            sums = GroupSums(groups, shape)
            sums.add_partial_sums(partial_sums[partial_sums["model"] == model_role])
            if empty := [name for name, count in sums.counts.items() if not count]:
                raise ExplorerError(f"No prompts left in group(s) {empty} to fit the {model_role} model's directions"
                                    f"{' after the refusal filter' if settings.filter_by_refusal else ''}.",
                                    "add prompts, or set directions.filter_by_refusal: false.")
            return sums

        sums = summed(role, split.groups(by_category=True))
        global_candidates = sums.mean_difference("toxic", "safe")
        rng = np.random.default_rng(settings.seed)

        def sample(mask: np.ndarray) -> list[str]:
            rows = np.flatnonzero(mask)
            rows = rng.choice(rows, size=min(len(rows), settings.max_validation_prompts), replace=False)
            return list(split.prompts["text"].to_numpy()[np.sort(rows)])

        cutoff = model.n_layers * (1 - settings.prune_last_fraction)
        layers = [layer for layer in range(0, model.n_layers, settings.layer_stride) if layer < cutoff]
        token_ids = refusal_token_ids(context.table("refusal_tokens"), role)
        validation = split.validation
        if settings.filter_by_refusal:
            validation = validation & split.refusal_kept(model, validation, token_ids, batch_size=batch_size)
        for name in ("toxic", "safe"):
            scored_on = int((validation & getattr(split, name)).sum())
            logger.info("%s prompts of the %s model: %d fit the directions, %d validate them%s", name, role,
                        sums.counts[name], scored_on, " (after the refusal filter)" if settings.filter_by_refusal else "")
            if not scored_on:
                raise ExplorerError(f"No {name} validation prompts left to choose the {role} model's direction"
                                    f"{' after the refusal filter' if settings.filter_by_refusal else ''}.",
                                    "add prompts, or set directions.filter_by_refusal: false.")
        scored = score_candidates(model, global_candidates, layers, positions.labels, token_ids,
                                  sample(validation & split.toxic), sample(validation & split.safe),
                                  alpha=settings.addition_alpha, batch_size=batch_size)
        rule = SelectionRule(max_kl=settings.max_kl, prune_last_fraction=settings.prune_last_fraction)
        candidates = select_candidate(scored, model.n_layers, rule)
        if not candidates["chosen"].any():
            best = cast(int, candidates["ablation_score"].idxmin())  # a label of select_candidate's RangeIndex
            candidates.loc[best, "chosen"] = True
            logger.warning("No candidate passed the selection filters; using the lowest ablation score "
                           "(layer %d), marked in direction_candidates.", candidates.loc[best, "layer"])
        chosen = candidates[candidates["chosen"]].iloc[0]
        layer, position = int(chosen["layer"]), int(chosen["position"])
        logger.info("Chosen direction: layer %d, position %s (ablation %.2f, induce %.2f, KL %.3f)",
                    layer, chosen["position_label"], chosen["ablation_score"], chosen["induce_score"], chosen["kl"])
        # Per category, every layer at the chosen position: [layers, d_model] each.
        per_layer = {"global": global_candidates[:, position]} | {
            c: sums.mean_difference(f"toxic {c}", "safe")[:, position] for c in split.categories}
        vectors = pd.DataFrame([
            {"scope": scope, "layer": lay, "position": position, "chosen": lay == layer,
             "norm": float(np.linalg.norm(values[lay])), "vector": values[lay].astype(np.float32).tolist()}
            for scope, values in per_layer.items() for lay in range(model.n_layers)]).assign(model=role)
        # The same site's direction in every other model, tested the same way (no search).
        tested = {other: summed(other, split.groups(by_category=False)).mean_difference("toxic", "safe")[layer, position]
                  for other in config.models if other != role}
        tested = {role: global_candidates[layer, position]} | tested
        return Selection({
            "direction_candidates": candidates.assign(model=role),
            "refusal_directions": vectors,
            "model_directions": pd.DataFrame({"model": list(tested),
                                              "vector": [v.astype(np.float32).tolist() for v in tested.values()]}),
        })

    @staticmethod
    def _evaluate(context: StageContext, load: Callable[[str], LoadedModel], selection: Selection,
                  prompts: pd.DataFrame) -> dict[str, pd.DataFrame]:
        """Per test prompt (all of them, or a shard's): each model's answers and safe-prompt effects
        under its direction, and the studied model's refusal score with each direction ablated."""
        config = context.config
        settings = config.directions
        assert settings is not None  # applies() guarantees it
        role, batch_size = settings.model, config.generation.batch_size
        tokens, generations = context.table("refusal_tokens"), context.table("generations")
        evaluated: list[pd.DataFrame] = []
        safe_effects: list[pd.DataFrame] = []
        for other_role in sorted(config.models, key=lambda name: name != role):
            model = load(other_role)
            token_ids = refusal_token_ids(tokens, other_role)
            answers = generations[generations["model"] == other_role].set_index("prompt_id")["response"]
            judged, safe_rows = direction_effects(
                model, prompts, selection.vector(other_role), selection.layer, settings.addition_alpha, token_ids,
                answers, max_new_tokens=settings.eval_max_new_tokens, batch_size=batch_size)
            evaluated.append(judged.assign(model=other_role))
            safe_effects.append(safe_rows.assign(model=other_role))
            if other_role == role:
                toxic = prompts[prompts["kind"] == "toxic"]
                ablated = [("none", None), ("global", selection.vector(role)), *selection.category_directions().items()]
                cross_scores = pd.concat([pd.DataFrame({
                    "order": order, "ablated": name, "prompt_id": toxic["id"].to_numpy(),
                    "score": refusal_scores_under_ablation(model, None if vector is None else torch.from_numpy(vector),
                                                           list(toxic["text"]), token_ids, batch_size=batch_size)})
                    for order, (name, vector) in enumerate(ablated)], ignore_index=True)
        return {"evaluated": pd.concat(evaluated, ignore_index=True),
                "safe_effects": pd.concat(safe_effects, ignore_index=True), "cross_scores": cross_scores}

    def _finish(self, context: StageContext, load: Callable[[str], LoadedModel], split: PromptSplit,
                selection: Selection, effects: Mapping[str, pd.DataFrame]) -> StageOutput:
        key = self.inputs(context.config) | {"prompts": context.hashes["prompts"]}
        with context.scratch("activations", key) as scratch:
            return self._finish_in(context, load, split, selection, effects, scratch)

    @staticmethod
    def _finish_in(context: StageContext, load: Callable[[str], LoadedModel], split: PromptSplit,
                   selection: Selection, effects: Mapping[str, pd.DataFrame], scratch: Path) -> StageOutput:
        """The test prompts' effects aggregated, and the geometry at the chosen position."""
        config = context.config
        settings = config.directions
        assert settings is not None  # applies() guarantees it
        role, batch_size = settings.model, config.generation.batch_size
        prompts, toxic, safe, fit, test = split.prompts, split.toxic, split.safe, split.fit, split.test
        kind = prompts["kind"].to_numpy()
        generations = context.table("generations").drop(columns="run_id")
        test_prompts = prompts[test]
        groups = test_prompts[["id", "category", "kind"]]
        models = sorted(config.models, key=lambda name: name != role)

        judged_frames: list[pd.DataFrame] = []
        harmless_frames: list[pd.DataFrame] = []
        for model_role in models:
            baseline = generations[(generations["model"] == model_role)
                                   & generations["prompt_id"].isin(test_prompts["id"])].assign(condition="baseline")
            mine = effects["evaluated"].query("model == @model_role")
            # Each condition's rows in test-prompt order, as one unsharded run makes them.
            ordered = [groups[["id"]].merge(mine[mine["condition"] == condition], left_on="id",
                                            right_on="prompt_id").drop(columns="id")
                       for condition in ("ablation", "addition")]
            judged = pd.concat([baseline, *ordered], ignore_index=True)
            judged = judged.drop(columns=["category", "kind", "split"], errors="ignore").merge(
                groups, left_on="prompt_id", right_on="id").drop(columns="id")
            judged_frames.append(judged.assign(model=model_role))
            safe_rows = groups[["id"]].merge(effects["safe_effects"].query("model == @model_role"),
                                             left_on="id", right_on="prompt_id")
            harmless_frames.append(harmlessness_table(safe_rows).assign(model=model_role))
        cross = effects["cross_scores"].merge(groups, left_on="prompt_id", right_on="id")
        cross_ablation = cross.groupby(["order", "ablated", "category"], sort=True)["score"].agg(
            n="size", mean_refusal_score="mean", refusal_rate_by_score=lambda v: float((v > 0).mean()))
        cross_ablation = cross_ablation.reset_index().drop(columns="order").assign(model=role)

        specificity = cross_ablation_specificity(cross[["prompt_id", "category", "ablated", "score"]],
                                                 split.categories, n_boot=settings.bootstrap, seed=settings.seed)

        # Geometry at the chosen position, for every model of the study, at every layer ([n, layers,
        # d_model], on disk): the toxic and safe prompts (separation compares them), and for the
        # studied model every prompt (its chosen site: projections, cosines and hard prompts), also
        # at the last instruction token (harm recognition, Zhao et al. 2025), from the same pass.
        layer, position = selection.layer, selection.position
        slots = sorted({0, position})  # positions captured: the instruction's end and the chosen one
        separation_rows: list[pd.DataFrame] = []
        projection_frames: list[pd.DataFrame] = []
        both = toxic | safe
        site = instruction_end = None
        for model_role in config.models:
            model = load(model_role)
            hooks = [f"blocks.{lay}.hook_resid_pre" for lay in range(model.n_layers)]
            offsets = [prompt_end_positions(model.tokenizer).offsets[slot] for slot in slots]
            captured = np.ones(len(prompts), dtype=bool) if model_role == role else both
            on_disk = np.lib.format.open_memmap(scratch / f"{model_role}.npy", mode="w+", dtype=np.float32,
                                                shape=(int(captured.sum()), model.n_layers, len(slots), model.d_model))
            every = capture(model, list(prompts["text"][captured]), hooks, offsets, batch_size=batch_size,
                            desc=f"capture {model_role} at the chosen position", out=on_disk)
            acts = every[:, :, slots.index(position), :]
            chosen_layer = np.asarray(acts[:, layer])
            if model_role == role:
                site, instruction_end = chosen_layer, np.asarray(every[:, layer, 0, :])
            # Rows in neither mask (hard prompts) are ignored: no copy of the activations.
            separation = layer_separation(acts, toxic[captured], (fit & both)[captured], (test & both)[captured])
            separation_rows.append(separation.assign(model=model_role))
            projection_frames.append(
                prompts.loc[captured, ["id", "category", "kind", "split"]].rename(columns={"id": "prompt_id"})
                .assign(model=model_role, projection=chosen_layer @ unit(selection.vector(model_role))))
        assert site is not None and instruction_end is not None  # role is one of config.models (StudyConfig checks)
        cosines = category_cosine_variants(site, instruction_end, split, selection.vector(role),
                                           selection.chosen["position_label"], n_boot=settings.bootstrap,
                                           seed=settings.seed)
        verdict = prompts["id"].map(generations[generations["model"] == role].set_index("prompt_id")["refused"])
        hard_refused = (kind == "hard") & verdict.eq(True).to_numpy()
        hard_answered = (kind == "hard") & verdict.eq(False).to_numpy()
        hard_direction = hard_prompt_direction(site, hard_refused, hard_answered, selection.vector(role),
                                                n_boot=settings.bootstrap, seed=settings.seed)
        form = form_probe(site, list(prompts["text"]), kind != "toxic", fit, selection.vector(role),
                          n_boot=settings.bootstrap, seed=settings.seed)
        direction_generations = pd.concat(judged_frames, ignore_index=True)
        return StageOutput(
            tables={
                "direction_candidates": selection.tables["direction_candidates"],
                "refusal_directions": selection.tables["refusal_directions"],
                "direction_generations": direction_generations,
                "direction_effects": refusal_rate_table(direction_generations,
                                                        ["model", "condition", "category", "kind"]),
                "direction_harmlessness": pd.concat(harmless_frames, ignore_index=True),
                "cross_ablation": cross_ablation,
                "layer_separation": pd.concat(separation_rows, ignore_index=True),
                "direction_projections": pd.concat(projection_frames, ignore_index=True),
                "category_cosines": cosines.assign(model=role),
                "cross_ablation_specificity": pd.DataFrame([specificity.__dict__]).assign(model=role, layer=layer),
                "hard_prompt_direction": pd.DataFrame([hard_direction]).assign(model=role),
                "form_probe": pd.DataFrame([form.row()]).assign(model=role, layer=layer, position=position),
            },
            models=tuple(config.models.values()),
        )
