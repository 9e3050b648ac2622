"""Stage `saes`: sparse autoencoders at the refusal layer and around it, and their features.

1. A token corpus: every prompt with the studied model's answer (test split) or its fine-tuning
   answer (train split), plus the other answers the study generated (the base model's, and the
   answers under ablation and addition), chat-formatted.
2. SAEs trained on it with SAELens (or loaded through SAELens' registry), quality measured on
   held-out transcripts: L0, fraction of variance unexplained, dead features, CE loss recovered.
3. Feature statistics: density, histogram, top texts with per-token activations, promoted and
   suppressed tokens, cosine with each refusal direction, activation by category and kind at the
   first response position, and attribution to the refusal score on toxic prompts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import pandas as pd
from sae_lens import SAE

from engine.circuits.attribution import metric_gradients
from engine.circuits.refusal_metric import RefusalMetric
from engine.data.prompts import stable_split
from engine.errors import ExplorerError
from engine.judging.judge import refusal_token_ids
from engine.runtime.activations import (
    SaeTokens,
    TokenActivations,
    capture,
    capture_tokens,
    prompt_end_positions,
    sae_tokens,
    spilled_rows,
)
from engine.runtime.generation import length_order
from engine.runtime.models import LoadedModel
from engine.saes.corpus import ChatCorpus, chat_corpus
from engine.saes.features import (
    baseline_means,
    decoder_cosines,
    encode_sparse,
    feature_attribution,
    logit_effects,
    summarize,
    token_activations,
    top_texts,
)
from engine.saes.training import (
    ActivationRows,
    ce_loss_recovered,
    check_sae_fits,
    load_sae,
    sae_quality,
    save_sae,
    stored_sae_source,
    train_sae,
)
from precompute.config import SaesConfig
from precompute.pipeline import ShardContext, ShardRound, StageContext, StageOutput
from precompute.shards import ShardSpec, in_shard
from precompute.stages.section import ModelSectionStage

logger = logging.getLogger(__name__)

MAX_CE_TEXTS = 256  # held-out transcripts for CE loss recovered (three forward passes each)
NO_DIRECTIONS = pd.DataFrame(columns=["scope", "layer", "position", "chosen", "vector"])
MERGE_ROWS = 65_536  # token rows copied at a time from the shards' activations into one file


@dataclass(frozen=True)
class SaeSetup:
    """What capturing and measuring both need: the model, the SAEs to load and the corpus."""

    model: LoadedModel
    prompts: pd.DataFrame
    tables: dict[str, pd.DataFrame]  # the upstream tables the stage reads
    pretrained: dict[str, tuple[SAE, dict[str, str]]]  # hook: (SAE, its config entry)
    directions: pd.DataFrame
    hooks: list[str]
    rows: pd.DataFrame  # one per transcript (corpus_rows)
    corpus: ChatCorpus

    @property
    def read(self) -> SaeTokens:
        return sae_tokens(self.model.tokenizer)


def corpus_rows(prompts: pd.DataFrame, generations: pd.DataFrame, tune_data: pd.DataFrame | None,
                direction_generations: pd.DataFrame | None, role: str) -> pd.DataFrame:
    """One transcript per prompt (source `prompt`), then every other distinct answer."""
    answers = [generations[generations["model"] == role][["prompt_id", "response"]].assign(source=f"answer:{role}")]
    if tune_data is not None:
        answers.append(tune_data[["prompt_id", "response"]].assign(source="tune data"))
    primary = pd.concat(answers).drop_duplicates("prompt_id")
    rows = prompts[["id", "text", "category", "kind"]].rename(columns={"id": "prompt_id"}).merge(
        primary, on="prompt_id", how="left")
    rows = rows.assign(response=rows["response"].fillna(""), source=rows["source"].fillna("prompt only"))
    extra = [generations[generations["model"] != role].assign(source="answer:" + generations["model"])]
    if direction_generations is not None:
        steered = direction_generations[(direction_generations["model"] == role)
                                        & (direction_generations["condition"] != "baseline")]
        extra.append(steered.assign(source=steered["condition"]))
    extra_rows = pd.concat(extra)[["prompt_id", "response", "source"]].merge(
        prompts[["id", "text", "category", "kind"]], left_on="prompt_id", right_on="id").drop(columns="id")
    extra_rows = extra_rows[extra_rows["response"].str.len() > 0]
    return pd.concat([rows, extra_rows], ignore_index=True).drop_duplicates(["prompt_id", "response"]) \
        .reset_index(drop=True).rename_axis("text_id").reset_index()


def _layer(hook_name: str) -> int | None:
    parts = hook_name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


class SaesStage(ModelSectionStage):
    name = "saes"
    version = 3
    upstream = ("prompts", "tune", "generate", "directions")
    runs_in_every_shard = False  # it saves trained SAEs beside the store (and trains for long)
    # Sharded, each shard captures its prompts' transcripts; the merge trains and measures the SAEs.
    shardable = True
    shard_keys: ClassVar[Mapping[str, tuple[str, ...]]] = {"corpus_tokens": ("text_id", "position")}

    @staticmethod
    def folder(context: StageContext) -> Path:
        """Where this run's trained SAEs are saved: beside the store, so the two travel together,
        one folder per input hash so an older copy of the store keeps its own SAEs."""
        store_path = context.config.store
        return store_path.parent / f"{store_path.stem}.saes" / context.hashes["saes"]

    def is_fresh(self, context: StageContext) -> bool:
        trained = context.table("saes").query("source == 'trained'")
        return all((Path(stored_sae_source(context.config.store, row)[0]) / "cfg.json").is_file()
                   for row in trained.to_dict("records"))

    @staticmethod
    def _hooks(settings: SaesConfig, directions: pd.DataFrame, model: LoadedModel) -> list[str]:
        if settings.hooks:
            return list(settings.hooks)
        chosen = directions[(directions["scope"] == "global") & directions["chosen"]]
        layer = int(chosen["layer"].iloc[0])
        layers = sorted({layer + offset for offset in settings.layer_offsets})
        if bad := [lay for lay in layers if not 0 <= lay < model.n_layers]:
            raise ExplorerError(f"saes.layer_offsets put SAEs at layers {bad}, outside {model.name}'s "
                                f"0..{model.n_layers - 1} (refusal layer {layer}).", "use smaller offsets.")
        return [f"blocks.{lay}.hook_resid_pre" for lay in layers]

    def run(self, context: StageContext) -> StageOutput:
        # The corpus' activations ([n_tokens, n_hooks, d_model], ~100 GB at OR-Bench scale) go to a
        # scratch file, memory-mapped: training and statistics read them a batch at a time.
        with context.scratch("sae_corpus", {"saes": context.hashes["saes"]}) as scratch:
            setup = self._setup(context)
            texts = np.arange(len(setup.rows))
            return self._measure(context, setup, self._capture(context, setup, texts, scratch / "activations.f32"))

    def run_shard(self, context: ShardContext, shard: ShardSpec, current: ShardRound) -> dict[str, Any]:
        """The activations of the transcripts of the shard's prompts (all of a prompt's answers)."""
        setup = self._setup(context)
        texts = np.flatnonzero(in_shard(setup.rows["prompt_id"], shard))
        scratch = context.partition_scratch("sae_corpus", {"saes": context.hashes["saes"], "shard": str(shard)})
        tokens = self._capture(context, setup, texts, scratch / "activations.f32")
        table = pd.DataFrame({"shard": shard.index, "row": np.arange(len(tokens.text_index)),
                              "text_id": tokens.text_index, "position": tokens.position, "token_id": tokens.token_id})
        return {"corpus_tokens": table, "activations": tokens.values}

    def merge_shards(self, context: StageContext, tables: Mapping[str, Any], current: ShardRound) -> StageOutput:
        """The shards' activations in one scratch file, in the row order one unsharded capture gives
        (transcripts longest first, tokens in order), then training and statistics as in `run`."""
        setup = self._setup(context)
        rank = np.empty(len(setup.rows), dtype=np.int64)
        rank[length_order([len(s) for s in setup.corpus.sequences])] = np.arange(len(setup.rows))
        found = tables["corpus_tokens"]
        found = found.iloc[np.lexsort((found["position"].to_numpy(), rank[found["text_id"].to_numpy()]))]
        parts = tables["activations"]
        with context.scratch("sae_corpus", {"saes": context.hashes["saes"]}) as scratch:
            spill = scratch / "activations.f32"
            with open(spill, "wb") as sink:
                for start in range(0, len(found), MERGE_ROWS):
                    chunk = found.iloc[start:start + MERGE_ROWS]
                    block = np.empty((len(chunk), *parts[0].shape[1:]), dtype=np.float32)
                    for index, part in enumerate(parts, start=1):
                        mine = (chunk["shard"] == index).to_numpy()
                        block[mine] = part[chunk["row"].to_numpy()[mine]]
                    sink.write(block.tobytes())
            tokens = TokenActivations(values=spilled_rows(spill, len(found), parts[0].shape[1:]),
                                      text_index=found["text_id"].to_numpy(),
                                      position=found["position"].to_numpy(), token_id=found["token_id"].to_numpy())
            return self._measure(context, setup, tokens)

    def _setup(self, context: StageContext) -> SaeSetup:
        """The model, the SAEs to load, their hooks, and the transcript corpus."""
        config = context.config
        settings = config.saes
        assert settings is not None  # applies() guarantees it
        model = config.generation.load(config.models[settings.model])
        prompts = context.table("prompts").drop(columns="run_id").reset_index(drop=True)
        tables = {name: context.table(name).drop(columns="run_id") for name in
                  ("generations", "tune_data", "direction_generations", "refusal_tokens", "refusal_directions")
                  if name in context.available}
        pretrained: dict[str, tuple[SAE, dict[str, str]]] = {}
        for entry in settings.pretrained:
            source = (entry["path"], None) if "path" in entry else (entry["release"], entry["sae_id"])
            sae = load_sae(*source, device=model.device)
            pretrained[check_sae_fits(sae, model)] = (sae, entry)
        directions = tables.get("refusal_directions", NO_DIRECTIONS)
        hooks = list(pretrained) or self._hooks(settings, directions, model)
        rows = corpus_rows(prompts, tables["generations"], tables.get("tune_data"),
                           tables.get("direction_generations"), settings.model)
        corpus = chat_corpus(model.tokenizer, list(rows["text"]), list(rows["response"]))
        return SaeSetup(model, prompts, tables, pretrained, directions, hooks, rows, corpus)

    @staticmethod
    def _capture(context: StageContext, setup: SaeSetup, texts: np.ndarray, spill: Path) -> TokenActivations:
        """The activations at every read token of transcripts `texts` (text_index counts all)."""
        tokens = capture_tokens(setup.model, [setup.corpus.sequences[i] for i in texts], setup.hooks,
                                batch_size=context.config.generation.batch_size, skip_token_ids=setup.read.skip_token_ids,
                                skip_first=setup.read.skip_first,
                                desc="capture corpus", spill=spill)
        return TokenActivations(tokens.values, texts[tokens.text_index], tokens.position, tokens.token_id)

    def _measure(self, context: StageContext, setup: SaeSetup, tokens: TokenActivations) -> StageOutput:
        """Train (or load) each SAE on the corpus' activations and describe its features."""
        config = context.config
        settings = config.saes
        assert settings is not None  # applies() guarantees it
        batch_size = config.generation.batch_size
        role = settings.model
        model, prompts, tables, saes, directions, hooks, rows, corpus = (
            setup.model, setup.prompts, setup.tables, setup.pretrained, setup.directions, setup.hooks, setup.rows,
            setup.corpus)
        read = setup.read
        held_out_text = np.array([stable_split(f"sae:{t}", settings.held_out_fraction) == "test"
                                  for t in rows["prompt_id"] + "|" + rows["response"]])
        held_out = held_out_text[tokens.text_index]
        logger.info("SAE corpus: %d transcripts, %d tokens (%d read by the SAEs, %d held out)",
                    len(rows), corpus.n_tokens, len(tokens.text_index), int(held_out.sum()))
        ce_texts = [corpus.sequences[i] for i in np.flatnonzero(held_out_text)[:MAX_CE_TEXTS]]

        positions = prompt_end_positions(model.tokenizer)
        site_rows = self._decision_rows(directions, tokens, corpus, len(prompts), positions.offsets)
        attribution_inputs = self._attribution_inputs(context, model, prompts, hooks, positions.offsets,
                                                      tables["refusal_tokens"], batch_size)
        output_embeddings = model.hf_model.get_output_embeddings()
        assert output_embeddings is not None  # a causal LM's lm_head
        unembedding = output_embeddings.weight
        sae_rows = []
        feature_frames: list[pd.DataFrame] = []
        example_frames: list[pd.DataFrame] = []
        group_frames: list[pd.DataFrame] = []
        cosine_frames: list[pd.DataFrame] = []
        for h, hook in enumerate(hooks):
            started = time.perf_counter()
            saved = self.folder(context) / hook
            if hook in saes:
                sae, origin = saes[hook]
            elif (saved / "cfg.json").is_file():
                # Trained by an interrupted run with these very inputs (save_sae writes atomically): resume.
                logger.info("SAE %s: trained by an earlier run of this stage, loaded from %s", hook, saved)
                sae = load_sae(str(saved), device=model.device)
                origin = {"path": str(saved.relative_to(config.store.parent))}
            else:
                sae = train_sae(settings.training(), ActivationRows(tokens.values, h, np.flatnonzero(~held_out)),
                                hook, model.name, device=model.device)
                path = save_sae(sae, saved)
                origin = {"path": str(path.relative_to(config.store.parent))}
            seconds = time.perf_counter() - started
            quality = sae_quality(sae, ActivationRows(tokens.values, h, np.flatnonzero(held_out)))
            ce = ce_loss_recovered(model, sae, ce_texts, batch_size=batch_size, skip_token_ids=read.skip_token_ids,
                                   skip_first=read.skip_first)
            sae_rows.append({
                "hook": hook, "layer": _layer(hook), "source": "pretrained" if hook in saes else "trained",
                # trained: relative to the store's folder; pretrained: a local folder or a registry entry
                "path": origin.get("path"), "release": origin.get("release"), "sae_id": origin.get("sae_id"),
                "architecture": sae.cfg.architecture(),
                "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae,
                "n_corpus_tokens": corpus.n_tokens, "n_train_tokens": int((~held_out).sum()),
                "n_held_out_tokens": int(held_out.sum()), "l0": quality.l0,
                "fraction_variance_unexplained": quality.fraction_variance_unexplained,
                "dead_fraction": quality.dead_fraction, "ce_clean": ce.clean, "ce_spliced": ce.spliced,
                "ce_zero_ablated": ce.zero_ablated, "ce_loss_recovered": ce.recovered, "train_seconds": seconds,
            })
            logger.info("SAE %s: L0 %.1f, FVU %.3f, dead %.1f%%, CE recovered %.3f", hook, quality.l0,
                        quality.fraction_variance_unexplained, 100 * quality.dead_fraction, ce.recovered)
            features, examples, groups, cosines = self._feature_tables(
                context, sae, hook, h, tokens, corpus, prompts, site_rows, attribution_inputs, unembedding,
                directions, lambda i: model.tokenizer.decode([i]))
            feature_frames.append(features)
            example_frames.append(examples)
            group_frames.append(groups)
            cosine_frames.append(cosines)
        corpus_table = rows[["text_id", "prompt_id", "source", "category", "kind"]].assign(
            prompt_tokens=corpus.prompt_lengths,
            tokens=cast(list[Any], corpus.tokens))  # a column of lists, which pandas-stubs do not allow for
        return StageOutput(
            tables={
                "saes": pd.DataFrame(sae_rows).assign(model=role),
                "sae_corpus": corpus_table,
                "features": pd.concat(feature_frames, ignore_index=True),
                "feature_examples": pd.concat(example_frames, ignore_index=True),
                "feature_groups": pd.concat(group_frames, ignore_index=True),
                "feature_direction_cosines": pd.concat(cosine_frames, ignore_index=True),
            },
            models=(config.models[role],),
        )

    @staticmethod
    def _decision_rows(directions: pd.DataFrame, tokens, corpus: ChatCorpus, n_prompts: int,
                       offsets: tuple[int, ...]) -> np.ndarray:
        """Row in `tokens` of each prompt's refusal-decision token (its transcript's position at
        the chosen direction's offset, else the first response position); -1 if not read."""
        chosen = directions.loc[directions["scope"] == "global", "position"]
        position = int(chosen.iloc[0]) if len(chosen) else len(offsets) - 1
        # Transcripts 0..n_prompts-1 are the prompts' own, in prompt order (corpus_rows).
        wanted = corpus.prompt_lengths[:n_prompts] + offsets[position]
        key = tokens.text_index.astype(np.int64) * 1_000_000 + tokens.position
        order = np.argsort(key)
        target = np.arange(n_prompts, dtype=np.int64) * 1_000_000 + wanted
        found = np.searchsorted(key[order], target).clip(max=len(key) - 1)
        return np.where(key[order][found] == target, order[found], -1)

    @staticmethod
    def _attribution_inputs(context: StageContext, model: LoadedModel, prompts: pd.DataFrame, hooks: list[str],
                            offsets: tuple[int, ...], refusal_tokens: pd.DataFrame, batch_size: int):
        """Refusal-score gradients on a sample of toxic prompts and safe-prompt baseline activations,
        at every hook and prompt-end position: ([n, hooks, offsets, d] x2, [m, hooks, offsets, d]).
        Train split only: the steering stage picks its features by this attribution and tests them
        on the test split."""
        settings = context.config.saes
        assert settings is not None  # applies() guarantees it
        rng = np.random.default_rng(settings.seed)

        def sample(kind: str) -> list[str]:
            texts = prompts.loc[(prompts["kind"] == kind) & (prompts["split"] == "train"), "text"].to_numpy()
            return list(texts[np.sort(rng.choice(len(texts), min(len(texts), settings.attribution_prompts),
                                                  replace=False))])

        metric = RefusalMetric("refusal_score", tuple(refusal_token_ids(refusal_tokens, settings.model)))
        gradients = metric_gradients(model, sample("toxic"), hooks, offsets, metric,
                                     batch_size=max(1, batch_size // 4), desc="attribution")
        baseline = capture(model, sample("safe"), hooks, offsets, batch_size=batch_size, desc="safe baseline")
        return gradients, baseline

    @staticmethod
    def _feature_tables(context: StageContext, sae: SAE, hook: str, h: int, tokens, corpus: ChatCorpus,
                        prompts: pd.DataFrame, site_rows: np.ndarray, attribution_inputs,
                        unembedding, directions: pd.DataFrame, decode):
        settings = context.config.saes
        assert settings is not None  # applies() guarantees it
        codes = encode_sparse(sae, tokens.values[:, h])
        summary = summarize(codes, settings.histogram_bins)
        d_sae = sae.cfg.d_sae

        # Top texts and their per-token activations (for highlighting).
        top = top_texts(codes, tokens.text_index, tokens.position, settings.top_examples)
        examples = pd.DataFrame({"hook": hook, "feature": top.feature, "rank": top.rank, "text_id": top.text_index,
                                 "position": top.position, "activation": top.activation})
        examples["token_activations"] = [
            token_activations(codes, tokens.text_index, tokens.position, f, t, len(corpus.sequences[t])).tolist()
            for f, t in zip(top.feature, top.text_index, strict=True)]

        # Activation at each prompt's decision token, by category and kind.
        per_prompt = codes.tocsr()[np.where(site_rows >= 0, site_rows, 0)].toarray()
        per_prompt[site_rows < 0] = np.nan
        groups: list[pd.DataFrame] = []
        kinds = prompts["kind"].to_numpy()
        # Keyed by (category, kind) (pandas-stubs say any hashable).
        indices = cast(dict[tuple[str, str], np.ndarray], prompts.groupby(["category", "kind"]).indices)
        for (category, kind), index in indices.items():
            values = per_prompt[index]
            groups.append(pd.DataFrame({"hook": hook, "feature": np.arange(d_sae), "category": category,
                                        "kind": kind, "n": int(np.isfinite(values[:, 0]).sum()),
                                        "mean_activation": np.nanmean(values, 0),
                                        "firing_rate": np.nanmean(values > 0, 0)}))
        rates = {kind: np.nanmean(per_prompt[kinds == kind] > 0, 0) for kind in ("toxic", "hard", "safe")}
        fired = {kind: (per_prompt[kinds == kind] > 0).sum(0) for kind in ("toxic", "safe")}
        toxic_by_category = pd.concat(groups).query("kind == 'toxic'").pivot(
            index="feature", columns="category", values="mean_activation").fillna(0.0)
        totals = toxic_by_category.sum(axis=1).replace(0, np.nan)

        # Decoder geometry: promoted / suppressed tokens, cosine with each refusal direction.
        top_ids, bottom_ids = logit_effects(sae, unembedding, settings.top_logits)
        layer = _layer(hook)
        here = directions[directions["layer"] == layer] if "resid_pre" in hook else directions.iloc[:0]
        cosines = pd.concat([pd.DataFrame({"hook": hook, "feature": np.arange(d_sae), "scope": row.scope,
                                           "cosine": decoder_cosines(sae, np.asarray(row.vector, np.float32))})
                             for row in here.itertuples()] or [pd.DataFrame(columns=["hook", "feature", "scope",
                                                                                      "cosine"])])
        global_cosine = cosines[cosines["scope"] == "global"].set_index("feature")["cosine"].reindex(range(d_sae))

        gradients, baseline = attribution_inputs
        attribution = feature_attribution(sae, gradients.activations[:, h], gradients.gradients[:, h],
                                          baseline_means(sae, baseline[:, h]))
        effects = attribution.feature_effects
        features = pd.DataFrame({
            "hook": hook, "feature": np.arange(d_sae), "density": summary.density,
            "max_activation": summary.max_activation, "mean_activation": summary.mean_activation,
            "histogram": summary.histogram.tolist(),
            "refusal_cosine": global_cosine.to_numpy(),
            "toxic_rate": rates["toxic"], "hard_rate": rates["hard"], "safe_rate": rates["safe"],
            "n_toxic_fired": fired["toxic"], "n_toxic": int((kinds == "toxic").sum()),
            "n_safe_fired": fired["safe"], "n_safe": int((kinds == "safe").sum()),
            "top_category": toxic_by_category.idxmax(1).where(totals.notna()).reindex(range(d_sae)).to_numpy(),
            "top_category_share": (toxic_by_category.max(axis=1) / totals).reindex(range(d_sae)).to_numpy(),
            "attribution": effects.mean(0),
            "attribution_se": effects.std(0, ddof=1) / np.sqrt(len(effects)),
            "top_tokens": [[decode(i) for i in row] for row in top_ids.tolist()],
            "bottom_tokens": [[decode(i) for i in row] for row in bottom_ids.tolist()],
        })
        # Add-half smoothing keeps the ratio finite when a feature never fires on safe prompts.
        features["toxic_safe_ratio"] = ((features["n_toxic_fired"] + 0.5) / (features["n_toxic"] + 1)) / (
            (features["n_safe_fired"] + 0.5) / (features["n_safe"] + 1))
        features["error_attribution"] = float(attribution.error_effects.mean())
        return features, examples, pd.concat(groups, ignore_index=True), cosines
