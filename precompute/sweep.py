"""`python -m precompute tune-sweep`: the demo fine-tune's trade-off, measured over a grid of settings.

Each grid point is a study of its own (the tuned model only, stages up to `evaluation`, or up to
`directions` to see whether the chosen refusal direction carries the point's refusal) with its
tuned copy in data/models/<tuned>-sweep-<hash> and its store in data/stores/sweep/, so a point that
was measured before is read back, not re-run. Every point is scored on prompts its tune did not see:
the study's toxic, hard and safe test prompts and the config's held-out evaluation sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import yaml

from engine.data import store
from engine.data.paths import stores_dir
from engine.errors import ExplorerError
from engine.judging.judge import refusal_rate_table
from engine.runtime.models import EMBEDDED_TUNED
from engine.tuning import TuneConfig
from precompute.config import PromptConfig, StudyConfig
from precompute.pipeline import run_pipeline
from precompute.stages import STAGES

logger = logging.getLogger(__name__)

BUILTIN_KEY = "builtin"  # not a tune setting: the built-in prompt set's variant
LAST_STAGES = ("evaluation", "directions")  # where a sweep point's study may stop


def parse_grid(settings: Sequence[str]) -> dict[str, list[Any]]:
    """`NAME=V1,V2` strings as {NAME: [V1, V2]} (values parsed as YAML scalars)."""
    valid = {f.name for f in dataclasses.fields(TuneConfig)} | {BUILTIN_KEY}
    grid: dict[str, list[Any]] = {}
    for setting in settings:
        name, sep, values = setting.partition("=")
        if not sep or not values or name not in valid:
            raise ExplorerError(f"Bad sweep setting {setting!r}.",
                                f"write NAME=V1,V2 with NAME one of {', '.join(sorted(valid))}.")
        grid[name] = [_scalar(v) for v in values.split(",")]
    return grid


def _scalar(text: str) -> Any:
    """A number where the text is one (YAML 1.1 reads 1e-4 as a string), else the YAML scalar."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def point_config(config: StudyConfig, point: Mapping[str, Any], until: str = "evaluation") -> StudyConfig:
    """The study that measures one grid point, up to stage `until`: the tuned model alone, its own model
    folder and store; the point whose settings are the config's own is the study itself (its tuned model
    is the one it studies)."""
    if until not in LAST_STAGES:
        raise ExplorerError(f"A sweep point's study cannot stop at {until!r}.", f"use one of {', '.join(LAST_STAGES)}.")
    if config.tune is None:
        raise ExplorerError("The config has no `tune:` section to sweep.", "use precompute/configs/demo.yaml.")
    settings = {k: v for k, v in point.items() if k != BUILTIN_KEY}
    tune = dataclasses.replace(config.tune, **settings)
    prompts = config.prompts
    if BUILTIN_KEY in point:
        sources = tuple({**s, "variant": point[BUILTIN_KEY]} if s.get("type") == "builtin" else s
                        for s in prompts.sources)
        prompts = PromptConfig(sources=sources, categories=prompts.categories, test_fraction=prompts.test_fraction)
    if tune == config.tune and prompts == config.prompts:
        return config
    key = json.dumps({"tune": dataclasses.asdict(tune), "prompts": dataclasses.asdict(prompts)}, sort_keys=True,
                     default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    study = f"{config.study}-sweep-{digest}"
    return dataclasses.replace(
        config, study=study, models={"tuned": f"{EMBEDDED_TUNED}-sweep-{digest}"}, prompts=prompts, tune=tune,
        store=stores_dir() / "sweep" / f"{study}.duckdb", saes=None, steering=None, circuits=None,
        directions=config.directions if until == "directions" else None)


def form_scores(study: StudyConfig, layer_share: float) -> dict[str, Any]:
    """The surface-form probe (engine.directions.form_probe) at one fixed site for every point alike: the residual
    stream before layer round(layer_share x n_layers) at the last prompt token, against the difference of
    means toxic minus safe over the train prompts."""

    from engine.directions.extraction import mean_difference
    from engine.directions.form_probe import form_probe
    from engine.runtime.activations import capture

    prompts = store.read_table(study.store, "prompts")
    model = study.generation.load(study.models["tuned"])
    layer = round(layer_share * model.n_layers)
    acts = capture(model, list(prompts["text"]), [f"blocks.{layer}.hook_resid_pre"], [-1],
                   batch_size=study.generation.batch_size, desc="form probe capture")[:, 0, 0, :]
    kind, fit = prompts["kind"].to_numpy(), (prompts["split"] == "train").to_numpy()
    refusal = mean_difference(acts, (kind == "toxic") & fit, (kind == "safe") & fit)
    probe = form_probe(acts, list(prompts["text"]), kind != "toxic", fit, refusal, n_boot=200, seed=0)
    return {"form_layer": layer, "form_cosine": f"{probe.cosine_with_refusal:.2f} [{probe.ci_low:.2f}, "
                                                 f"{probe.ci_high:.2f}]", "form_probe_accuracy": probe.probe_accuracy}


def point_scores(study: StudyConfig) -> dict[str, Any]:
    """The tuned model's refusal rates (Wilson 95% intervals) at a measured point: test prompts by kind and
    evaluation sets (the point that is the study itself also holds its base model's answers)."""
    row: dict[str, Any] = {}
    generations = store.read_table(study.store, "generations").query("model == 'tuned'")
    test = generations[generations["split"] == "test"]
    for kind, group in test.groupby("kind"):
        row[f"{kind}_test"] = _rate(group)
    if study.evaluation is not None:
        evaluated = store.read_table(study.store, "evaluation_generations").query("model == 'tuned'")
        for name, group in evaluated.groupby("set"):
            row[str(name)] = _rate(group)
    data = store.read_table(study.store, "tune_data")
    row["n_train"] = len(data)
    return row


def direction_scores(study: StudyConfig) -> dict[str, Any]:
    """What ablating the point's chosen refusal direction leaves refused of its toxic test prompts, at what
    KL on its safe test prompts (the `directions` stage's own figures, as the Directions page shows them)."""
    from app.findings import study_findings

    direction = study_findings(study.store).direction
    if direction is None:
        return {"chosen_site": "none"}
    candidates = store.read_table(study.store, "direction_candidates")
    chosen = candidates[(candidates["model"] == direction.model) & candidates["chosen"]]
    # With no candidate passing the filters the stage falls back to the lowest ablation score: say so.
    fallback = "" if chosen["eligible"].all() else " (none passed the filters: lowest ablation score)"
    return {"chosen_site": f"layer {direction.layer} {direction.position_label!r}{fallback}",
            "toxic_ablated": direction.toxic_ablated.text(), "kl_ablated": round(direction.kl, 3)}


def _rate(judged: pd.DataFrame) -> str:
    """The refusal rate of judged answers with its Wilson 95% interval (engine.judging.judge.refusal_rate_table)."""
    rate = refusal_rate_table(judged.assign(everything=True), ["everything"]).iloc[0]
    return f"{rate['rate']:.1%} [{rate['ci_low']:.1%}, {rate['ci_high']:.1%}] n={rate['n']}"


def run_sweep(config: StudyConfig, grid: Mapping[str, Sequence[Any]], *, until: str = "evaluation",
              form_layer_share: float = 0.7) -> pd.DataFrame:
    """Build and score every grid point up to stage `until` (each skipped where its store is up to date)."""
    rows = []
    for point in grid_points(grid):
        study = point_config(config, point, until)
        logger.info("Sweep point %s -> %s", point, study.study)
        run_pipeline(study, STAGES, until=until)
        directions = direction_scores(study) if until == "directions" else {}
        rows.append({**point, **point_scores(study), **form_scores(study, form_layer_share), **directions})
    return pd.DataFrame(rows)
