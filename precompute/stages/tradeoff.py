"""Stage `tradeoff`: how much refusal directional ablation removes, and at what cost to safe prompts.

One chosen direction may not carry all of a model's refusal: Wollschläger et al. (ICML 2025) find
multi-dimensional refusal cones, and on the embedded demo model the chosen direction leaves most
toxic prompts refused while later layers' directions remove refusal at a larger KL. Each point
ablates a span of directions at every layer and position, with a weight:
- weight w: the chosen direction, x - w (x.r) r (w = 1 is the directions stage's ablation);
- cone k: the span of the k best layers' directions at the chosen position, ranked by their
  validation ablation score among those that induce refusal when added (direction_candidates: chosen
  on the validation prompts, measured here on the test prompts);
- categories: the span of every category's direction at the chosen layer;
- rdo k (with `directions.rdo_steps` > 0): the k directions refusal direction optimisation finds
  (engine.rdo, started from the chosen direction), fitted on train-split prompts the directions stage
  validates on, measured on the test prompts like every other point.
Refusal is read by the refusal score (> 0) on the toxic test prompts (under the chosen direction's
ablation it matched the substring judge on the demo's answers within a point), the side effect by the
KL of the next-token distribution on the safe test prompts. Writes `ablation_tradeoff`.

The same stage asks whether the global and category directions are one mechanism read several times:
`direction_independence` holds, for every ordered pair, the share of the second direction's induced
refusal (added at the chosen layer, on safe test prompts) that ablating the first removes
(engine.independence), with bootstrap intervals. `addition_tradeoff` sweeps the strength of the chosen
direction's addition (times its norm; 1 is the directions stage's addition): refusal by the refusal
score on the toxic, hard and safe test prompts and the KL on the safe ones, the curve the Steering
page's strength slider reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from engine.direction_scoring import (
    AblationPoint,
    ablation_tradeoff,
    addition_sweep,
    addition_table,
    tradeoff_table,
)
from engine.independence import SiteDirection, independence_matrix
from engine.judge import refusal_token_ids
from engine.prompts import seeded_texts
from engine.rdo import RdoSettings, optimise_refusal_directions
from engine.schema import KINDS
from precompute.config import StudyConfig
from precompute.pipeline import Stage, StageContext, StageOutput
from precompute.stages.generate import model_fingerprint

ABLATION_WEIGHTS = (0.25, 0.5, 0.75, 1.0)
CONE_SIZES = (1, 2, 3, 4)
ADDITION_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)  # times the direction's norm
RDO_PROMPTS = 32  # toxic and safe train-split prompts each, a seeded sample, to fit RDO on
INDEPENDENCE_PROMPTS = 32  # safe test prompts (a seeded sample): (directions + 1)^2 passes over them


def independence_directions(directions: pd.DataFrame, alpha: float | None) -> dict[str, SiteDirection]:
    """The chosen global direction and every category direction at its layer, each added there."""
    chosen = directions[(directions["scope"] == "global") & directions["chosen"]].iloc[0]
    layer = int(chosen["layer"])
    at_layer = directions[(directions["layer"] == layer) & ((directions["scope"] != "global") | directions["chosen"])]
    return {str(row.scope): SiteDirection(np.asarray(row.vector, dtype=np.float32), layer, alpha)
            for row in at_layer.sort_values("scope", key=lambda s: s != "global", kind="stable").itertuples()}


def tradeoff_points(directions: pd.DataFrame, candidates: pd.DataFrame) -> list[AblationPoint]:
    """The points for a study's `refusal_directions` and `direction_candidates` (the studied model's)."""
    def vector(row: Any) -> np.ndarray:
        return np.asarray(row.vector, dtype=np.float32)

    global_rows = directions[directions["scope"] == "global"].set_index("layer")
    chosen = global_rows[global_rows["chosen"]]
    layer, position = int(chosen.index[0]), int(chosen["position"].iloc[0])
    points = [AblationPoint("weight", w, vector(chosen.iloc[0])[None], weight=w, sites=f"layer {layer}")
              for w in ABLATION_WEIGHTS]
    at_position = candidates[(candidates["position"] == position) & (candidates["induce_score"] > 0)]
    ranked = at_position.dropna(subset=["ablation_score"]).sort_values("ablation_score")["layer"].astype(int).tolist()
    for k in CONE_SIZES:
        if k <= len(ranked):
            layers = ranked[:k]
            points.append(AblationPoint("cone", k, np.stack([vector(global_rows.loc[lay]) for lay in layers]),
                                        sites="layers " + ", ".join(map(str, layers))))
    categories = directions[(directions["scope"] != "global") & (directions["layer"] == layer)]
    if len(categories):
        points.append(AblationPoint("categories", len(categories), np.stack([vector(r) for r in categories.itertuples()]),
                                    sites=f"{len(categories)} category directions, layer {layer}"))
    return points


class TradeoffStage(Stage):
    name = "tradeoff"
    version = 3
    upstream = ("prompts", "generate", "directions")

    def applies(self, config: StudyConfig) -> bool:
        return config.directions is not None

    def inputs(self, config: StudyConfig) -> dict[str, Any]:
        assert config.directions is not None  # applies() guarantees it
        role = config.directions.model
        return {"model": model_fingerprint(config.models[role]), "role": role, "weights": ABLATION_WEIGHTS,
                "cone_sizes": CONE_SIZES, "bootstrap": config.directions.bootstrap, "seed": config.directions.seed,
                "batch_size": config.generation.batch_size, "dtype": config.generation.dtype_name,
                "addition_alpha": config.directions.addition_alpha, "independence_prompts": INDEPENDENCE_PROMPTS,
                "addition_strengths": ADDITION_STRENGTHS,
                **({"rdo_steps": config.directions.rdo_steps, "rdo_prompts": RDO_PROMPTS}
                   if config.directions.rdo_steps else {})}

    @staticmethod
    def _rdo_points(model: Any, train: pd.DataFrame, directions: pd.DataFrame, token_ids: list[int],
                    context: StageContext) -> list[AblationPoint]:
        """RDO's cones of k = 1..4 directions, fitted on train-split prompts (a seeded sample of each kind)."""
        settings = context.config.directions
        assert settings is not None
        chosen = directions[(directions["scope"] == "global") & directions["chosen"]].iloc[0]
        sample = {kind: seeded_texts(train, kind, RDO_PROMPTS, settings.seed) for kind in ("toxic", "safe")}
        points = []
        for k in CONE_SIZES:
            found = optimise_refusal_directions(
                model, sample["toxic"], sample["safe"], token_ids,
                RdoSettings(k=k, steps=settings.rdo_steps, seed=settings.seed),
                start=np.asarray(chosen["vector"], np.float32), batch_size=context.config.generation.batch_size)
            points.append(AblationPoint("rdo", k, found.directions.astype(np.float32),
                                        sites=f"{k} optimised direction(s), fitted on {RDO_PROMPTS} + {RDO_PROMPTS} "
                                              "train prompts"))
        return points

    def run(self, context: StageContext) -> StageOutput:
        config = context.config
        settings = config.directions
        assert settings is not None
        role = settings.model
        directions = context.table("refusal_directions").query("model == @role")
        candidates = context.table("direction_candidates").query("model == @role")
        points = tradeoff_points(directions, candidates)
        prompts = context.table("prompts")
        test = prompts.query("split == 'test'")
        model = config.generation.load(config.models[role])
        token_ids = refusal_token_ids(context.table("refusal_tokens"), role)
        if settings.rdo_steps:
            points += self._rdo_points(model, prompts.query("split == 'train'"), directions, token_ids, context)
        per_prompt = ablation_tradeoff(
            model, points, list(test.loc[test["kind"] == "toxic", "text"]), list(test.loc[test["kind"] == "safe", "text"]),
            token_ids, batch_size=config.generation.batch_size)
        table = tradeoff_table(per_prompt, points, n_boot=settings.bootstrap, seed=settings.seed)
        sample = seeded_texts(test, "safe", INDEPENDENCE_PROMPTS, settings.seed)
        independence = independence_matrix(
            model, independence_directions(directions, settings.addition_alpha), sample,
            token_ids, batch_size=config.generation.batch_size,
            n_boot=settings.bootstrap, seed=settings.seed)
        chosen = directions[(directions["scope"] == "global") & directions["chosen"]].iloc[0]
        sweep = addition_sweep(model, np.asarray(chosen["vector"], np.float32), int(chosen["layer"]), ADDITION_STRENGTHS,
                               {kind: test.loc[test["kind"] == kind, "text"].tolist() for kind in KINDS
                                if (test["kind"] == kind).any()},
                               token_ids,
                               batch_size=config.generation.batch_size)
        return StageOutput(tables={"ablation_tradeoff": table.assign(model=role),
                                   "direction_independence": independence.assign(model=role),
                                   "addition_tradeoff": addition_table(sweep, n_boot=settings.bootstrap,
                                                                       seed=settings.seed).assign(model=role)},
                           models=(config.models[role],))
