"""`python -m precompute evaluate`: a built study's models and refusal direction over another prompt set.

Does the tuned model refuse a public benchmark's harmful requests, and does the chosen direction
still remove (ablated) and induce (added) refusal there? Every model of the study answers the set
unmodified; the directions stage's model also answers with the chosen global direction ablated and
added. Each answer is judged by both judges (refusal phrases; refusal score with the study's own
refusal tokens), and a bypassed answer is checked for coherence (engine.judging.coherence: loops, and text
the base model finds less likely than 95% of the studied model's own unsteered answers).

Prompts the study fitted on (its train split, the fine-tune's data) are left out and counted, as are
prompts not sampled (`max_prompts`). Answers are cached per chunk, so an interrupted run resumes.
Writes `benchmark_generations` and `benchmark_rates` (Wilson 95% intervals per set x model x
condition x kind x category) into the study's store, replacing only this set's rows.

The prompt set is a small YAML file:

    name: xstest
    sources:
      - {type: xstest, path: /data/xstest_prompts.csv}
    max_new_tokens: 32
    max_prompts: 200   # a seeded sample per kind (optional)
    classifier: meta-llama/Llama-Guard-3-1B   # optional: a classifier judge (HF id or folder)
    classifier_format: llamaguard             # llamaguard, wildguard or harmbench
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from engine.config_checks import check_choice
from engine.data import store
from engine.data.chunked import map_in_chunks
from engine.data.paths import cache_dir
from engine.data.prompt_sources import load_prompt_source
from engine.data.schema import COMMAND_TABLES
from engine.errors import ExplorerError
from engine.judging.classifier_judge import ClassifierName, classify
from engine.judging.coherence import CoherenceRule, repetition_rate
from engine.judging.evaluation import judged_answers
from engine.judging.judge import refusal_token_ids
from engine.runtime.models import LoadedModel
from engine.runtime.scoring import completion_cross_entropy
from engine.stats import wilson_interval
from engine.steering.spec import Addition, Steering
from precompute.config import StudyConfig
from precompute.stages.evaluation import held_out
from precompute.stages.generate import model_fingerprint
from precompute.stages.prompts import kept_prompts

logger = logging.getLogger(__name__)

SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
BASELINE, ABLATED, ADDED = "baseline", "direction ablated", "direction added"
NOT_SAMPLED = "beyond max_prompts (seeded sample per kind)"
FITTED = "the study trained or fitted on it"


@dataclass(frozen=True)
class PromptSet:
    name: str
    sources: tuple[dict[str, Any], ...]
    max_new_tokens: int = 32
    max_prompts: int | None = None  # per kind
    seed: int = 0
    chunk_size: int = 64
    classifier: str | None = None  # a safety classifier (HF id or folder) judging every answer's content
    classifier_format: ClassifierName = "llamaguard"

    def __post_init__(self) -> None:
        check_choice("prompt set", "classifier_format", self.classifier_format, ClassifierName)
        if not isinstance(self.name, str) or not SET_NAME.match(self.name):
            raise ExplorerError(f"Prompt set name {self.name!r} is not allowed.",
                                "use letters, digits, '_', '-' or '.', starting with a letter or digit (<= 64).")
        if not self.sources or not all(isinstance(s, dict) for s in self.sources):
            raise ExplorerError(f"Prompt set {self.name} has no sources.",
                                "list them under `sources:` as in a study config's prompts.sources.")
        if not 1 <= self.max_new_tokens <= 2048:
            raise ExplorerError(f"max_new_tokens = {self.max_new_tokens} is out of range.", "use 1-2048.")
        if self.max_prompts is not None and not 1 <= self.max_prompts <= 1_000_000:
            raise ExplorerError(f"max_prompts = {self.max_prompts} is out of range.", "use 1-1000000 or leave it out.")
        if not 1 <= self.chunk_size <= 100_000:
            raise ExplorerError(f"chunk_size = {self.chunk_size} is out of range.", "use 1-100000.")


def load_prompt_set(path: Path) -> PromptSet:
    """A prompt set YAML file, validated."""
    if not path.is_file():
        raise ExplorerError(f"Prompt set file {path} does not exist.", "check the --prompts path.")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ExplorerError(f"{path} is not a YAML mapping.", "write `name:` and `sources:` keys (see --help).")
    allowed = {field.name for field in dataclasses.fields(PromptSet)}
    if unknown := sorted(set(raw) - allowed):
        raise ExplorerError(f"Unknown key(s) {unknown} in {path}.", f"use {', '.join(sorted(allowed))}.")
    return PromptSet(**{**raw, "sources": tuple(raw.get("sources") or ())})


@dataclass(frozen=True)
class SetPrompts:
    prompts: pd.DataFrame
    left_out: dict[str, int]


def set_prompts(prompt_set: PromptSet, study_prompts: pd.DataFrame, fitted: set[str], *,
                test_fraction: float) -> SetPrompts:
    """The set's prompts the study never fitted on, sampled per kind; every prompt left out counted."""
    kept = kept_prompts([load_prompt_source(s, test_fraction=test_fraction) for s in prompt_set.sources], None)
    unseen, n_fitted = held_out(kept.prompts, fitted | set(study_prompts.loc[study_prompts["split"] == "train", "id"]))
    left_out = dict(kept.left_out) | ({FITTED: n_fitted} if n_fitted else {})
    if prompt_set.max_prompts is not None:
        shuffled = unseen.sample(frac=1.0, random_state=prompt_set.seed)
        sampled = shuffled.groupby("kind").head(prompt_set.max_prompts)
        if dropped := len(unseen) - len(sampled):
            left_out[NOT_SAMPLED] = dropped
        unseen = sampled.sort_index().reset_index(drop=True)
    if unseen.empty:
        raise ExplorerError(f"Prompt set {prompt_set.name} has no prompt the study did not fit on.",
                            "use a set that is not the study's own training data.")
    return SetPrompts(unseen, left_out)


def benchmark_rates(generations: pd.DataFrame) -> pd.DataFrame:
    """Refused, bypassed and coherently answered shares per set x model x condition x kind x category
    (and over all categories as 'all'), with Wilson 95% intervals; answers the classifier judge calls
    harmful where one judged the set."""
    keys = ["set", "model", "condition", "kind"]
    frames = [generations, generations.assign(category="all")]
    judged = pd.concat(frames)
    classified = "harmful_by_classifier" in judged
    grouped = judged.assign(harmful_by_classifier=judged["harmful_by_classifier"] if classified else False).groupby(
        [*keys, "category"], as_index=False).agg(
        n=("refused", "size"), n_refused=("refused", "sum"), n_degenerate=("degenerate", "sum"),
        mean_refusal_score=("refusal_score", "mean"), n_harmful_by_classifier=("harmful_by_classifier", "sum"))
    if not classified:  # no classifier judged this set: unknown, not zero
        grouped["n_harmful_by_classifier"] = np.nan
    grouped["n_coherent"] = grouped["n"] - grouped["n_refused"] - grouped["n_degenerate"]
    for name, count in (("rate", "n_refused"), ("coherent_rate", "n_coherent")):
        low, high = wilson_interval(grouped[count], grouped["n"])
        grouped[name], grouped[f"{name}_low"], grouped[f"{name}_high"] = grouped[count] / grouped["n"], low, high
    return grouped


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _conditions(config: StudyConfig) -> dict[str, list[tuple[str, Steering]]]:
    """Per model role, the conditions it answers under: unmodified for every model; the chosen global
    direction ablated and added for the directions stage's model."""
    conditions: dict[str, list[tuple[str, Steering]]] = {role: [(BASELINE, Steering())] for role in config.models}
    if config.directions is None or not config.store.exists() or "refusal_directions" not in store.table_names(
            config.store):
        return conditions
    directions = store.read_table(config.store, "refusal_directions")
    chosen = directions[directions["chosen"] & (directions["scope"] == "global")]
    if chosen.empty:
        return conditions
    row = chosen.iloc[0]
    vector = np.asarray(row["vector"], dtype=np.float32)
    conditions[config.directions.model] += [
        (ABLATED, Steering(ablate=(vector,))),
        (ADDED, Steering(add=(Addition(vector, int(row["layer"]), config.directions.addition_alpha),)))]
    return conditions


def run_evaluate(config: StudyConfig, prompt_set: PromptSet, rule: CoherenceRule | None = None) -> pd.DataFrame:
    """Answer, judge and check the set under every condition; store the set's tables; return its rates."""
    rule = rule or CoherenceRule()
    if not config.store.exists() or "refusal_tokens" not in store.table_names(config.store):
        raise ExplorerError(f"The study store {config.store} does not hold the generate stage's tables yet.",
                            f"build the study first: python -m precompute run --config <its config> "
                            f"--store {config.store}")
    available = store.table_names(config.store)
    study_prompts = store.read_table(config.store, "prompts")
    fitted = set(store.read_table(config.store, "tune_data")["prompt_id"]) if "tune_data" in available else set()
    selected = set_prompts(prompt_set, study_prompts, fitted, test_fraction=config.prompts.test_fraction)
    prompts = selected.prompts
    for reason, count in selected.left_out.items():
        logger.warning("Prompt set %s: %d prompt(s) left out (%s)", prompt_set.name, count, reason)
    logger.info("Prompt set %s: %d prompts (%s)", prompt_set.name, len(prompts),
                ", ".join(f"{k} {v}" for k, v in prompts["kind"].value_counts().sort_index().items()))
    tokens = store.read_table(config.store, "refusal_tokens")
    frames: list[pd.DataFrame] = []
    for role, conditions in _conditions(config).items():
        model = config.generation.load(config.models[role])
        for condition, steering in conditions:
            frames.append(_condition_answers(config, prompt_set, prompts, model, role, condition, steering,
                                             refusal_token_ids(tokens, role)).assign(model=role))
        del model  # freed before the next one loads
    answers = pd.concat(frames, ignore_index=True)
    answers["cross_entropy"] = _base_cross_entropy(config, prompts, answers)
    answers["repetition"] = answers["response"].map(repetition_rate)
    thresholds = {}
    for role, own in answers.groupby("model"):
        reference = own[(own["condition"] == BASELINE) & ~own["refused"].astype(bool)]["cross_entropy"]
        thresholds[role] = rule.threshold(reference.to_numpy())
        logger.info("Coherence reference for %s: cross-entropy <= %.2f nats/token (%d unsteered answers)", role,
                    thresholds[role], len(reference))
    answers["degenerate"] = pd.concat([rule.degenerate(own, thresholds[role]) for role, own in
                                       answers.groupby("model")]).reindex(answers.index)
    generations = answers.merge(prompts[["id", "text", "category", "kind", "source"]], left_on="prompt_id",
                                right_on="id").drop(columns="id").assign(set=prompt_set.name)
    if prompt_set.classifier is not None:
        generations = _classified(config, prompt_set, generations)
    rates = benchmark_rates(generations)
    _store(config, prompt_set, {"benchmark_generations": generations, "benchmark_rates": rates}, selected.left_out)
    return rates


def _condition_answers(config: StudyConfig, prompt_set: PromptSet, prompts: pd.DataFrame, model: LoadedModel,
                       role: str, condition: str, steering: Steering, token_ids: list[int]) -> pd.DataFrame:
    """One model's judged answers under one condition, cached per chunk under everything they depend on."""
    key = {"model": model_fingerprint(config.models[role]), "dtype": config.generation.dtype_name,
           "condition": condition, "prompts": _digest({"ids": prompts["id"].tolist()}), "tokens": token_ids,
           "max_new_tokens": prompt_set.max_new_tokens,
           "steering": [np.round(v, 6).tolist() for v in steering.ablate]
           + [(np.round(a.direction, 6).tolist(), a.layer, a.alpha) for a in steering.add]}
    return map_in_chunks(
        prompts, lambda chunk: judged_answers(model, chunk, condition, steering.hooks(model), token_ids,
                                              max_new_tokens=prompt_set.max_new_tokens,
                                              batch_size=config.generation.batch_size),
        cache=cache_dir() / config.study / "evaluate" / prompt_set.name / _digest(key),
        chunk_size=prompt_set.chunk_size, desc=f"{prompt_set.name}: {role}, {condition}")


def _classified(config: StudyConfig, prompt_set: PromptSet, generations: pd.DataFrame) -> pd.DataFrame:
    """Every answer judged by the classifier (`harmful_by_classifier`, its raw `classifier_verdict`), cached
    per chunk like the answers."""
    assert prompt_set.classifier is not None
    classifier = config.generation.load(prompt_set.classifier)
    key = {"classifier": model_fingerprint(prompt_set.classifier), "format": prompt_set.classifier_format,
           "answers": _digest({"pairs": list(zip(generations["text"], generations["response"], strict=True))})}
    verdicts = map_in_chunks(
        generations, lambda chunk: classify(classifier, prompt_set.classifier_format, chunk["text"].tolist(),
                                            chunk["response"].tolist(), batch_size=config.generation.batch_size),
        cache=cache_dir() / config.study / "evaluate" / prompt_set.name / f"classifier-{_digest(key)}",
        chunk_size=prompt_set.chunk_size, desc=f"{prompt_set.name}: {prompt_set.classifier_format} judge")
    return generations.assign(harmful_by_classifier=verdicts["harmful"].to_numpy(),
                              classifier_verdict=verdicts["verdict"].to_numpy())


def _base_cross_entropy(config: StudyConfig, prompts: pd.DataFrame, answers: pd.DataFrame) -> np.ndarray:
    """The base model's cross-entropy of every answer given its prompt (cached with the answers)."""
    base = config.models.get("base", next(iter(config.models.values())))
    text = prompts.set_index("id")["text"]
    instructions = text.loc[answers["prompt_id"]].tolist()
    model = config.generation.load(base)
    return completion_cross_entropy(model, instructions, answers["response"].tolist(),
                                    batch_size=config.generation.batch_size)


def _store(config: StudyConfig, prompt_set: PromptSet, tables: dict[str, pd.DataFrame],
           left_out: dict[str, int]) -> None:
    """This set's rows replace its earlier rows; other sets' rows stay."""
    available = store.table_names(config.store)
    merged = {}
    for name, frame in tables.items():
        earlier = (store.read_table(config.store, name).drop(columns="run_id") if name in available
                   else frame.iloc[:0])
        merged[name] = pd.concat([earlier[earlier["set"] != prompt_set.name], frame], ignore_index=True)
    if undeclared := sorted(set(merged) - set(COMMAND_TABLES["evaluate"])):
        raise ValueError(f"evaluate writes undeclared table(s) {undeclared}: declare them in engine.data.schema")
    run = store.RunRecord(study=config.study, stage="evaluate", models=tuple(config.models.values()),
                          dataset=prompt_set.name,
                          config={"prompt_set": prompt_set.__dict__, "left_out": left_out})
    sets = sorted(merged["benchmark_rates"]["set"].unique())
    store.write_stage(config.store, run=run, input_hash=_digest({"sets": sets}), tables=merged)
