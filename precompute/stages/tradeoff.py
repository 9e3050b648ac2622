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
  (engine.directions.rdo, started from the chosen direction), fitted on train-split prompts the directions stage
  validates on, measured on the test prompts like every other point.
Refusal is read by the refusal score (> 0) on the toxic test prompts (under the chosen direction's
ablation it matched the substring judge on the demo's answers within a point), the side effects on the
safe test prompts by the KL of the next-token distribution and the cross-entropy of the model's own
unsteered answers (a seeded sample of CE_PROMPTS of them: each pass is a forward over prompt and
answer). Writes `ablation_tradeoff`.

The same stage asks whether the global and category directions (and RDO's, when fitted) are one
mechanism read several times:
`direction_independence` holds, for every ordered pair, the share of the second direction's induced
refusal (added at the chosen layer, on safe test prompts) that ablating the first removes
(engine.directions.independence), with bootstrap intervals. `addition_tradeoff` sweeps the strength of the chosen
direction's addition (times its norm; 1 is the directions stage's addition): refusal by the refusal
score on the toxic, hard and safe test prompts, the KL and answer cross-entropy on the safe ones, the curve the Steering
page's strength slider reads.

`tradeoff_answers` holds what the points look like: greedy answers (`directions.eval_max_new_tokens`
tokens, judged by the substring judge) of a seeded sample of test prompts at every point, toxic and
safe ones under each ablation, safe and hard ones under each addition strength.

Each part (ablation points, independence, addition sweep, answers) is cached under what it depends
on, so an interrupted run resumes and a change to one part does not redo the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch

from engine.data.chunked import cached_frames
from engine.data.prompts import seeded_sample, seeded_texts
from engine.data.schema import KINDS
from engine.data.store import rows_of
from engine.directions.independence import SiteDirection, independence_matrix
from engine.directions.rdo import RdoSettings, optimise_refusal_directions
from engine.directions.scoring import (
    AblationPoint,
    OwnAnswers,
    ablation_tradeoff,
    addition_sweep,
    addition_table,
    point_label,
    tradeoff_table,
)
from engine.judging.evaluation import judged_answers
from engine.judging.judge import refusal_token_ids
from engine.runtime.interventions import Hook, ablation_hooks, addition_hooks
from precompute.config import StudyConfig
from precompute.pipeline import Stage, StageContext, StageOutput
from precompute.stages.generate import model_fingerprint

ABLATION_WEIGHTS = (0.25, 0.5, 0.75, 1.0)
CONE_SIZES = (1, 2, 3, 4)
ADDITION_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)  # times the direction's norm
RDO_PROMPTS = 32  # toxic and safe train-split prompts each, a seeded sample, to fit RDO on
INDEPENDENCE_PROMPTS = 32  # safe test prompts (a seeded sample): (directions + 1)^2 passes over them
ANSWER_PROMPTS = 4  # test prompts of each kind (a seeded sample) answered at every point
ABLATION_ANSWER_KINDS = ("toxic", "safe")  # does refusal go, and do safe answers stay intact?
ADDITION_ANSWER_KINDS = ("safe", "hard")  # does refusal come, and what does it look like?
# Safe test prompts (a seeded sample) whose answers' cross-entropy is read at every point beside the KL:
# does the intervention damage what the model says, not only how it starts?
CE_PROMPTS = 48


def chosen_direction(directions: pd.DataFrame) -> pd.Series:
    """The chosen global direction's row of a model's `refusal_directions`."""
    return directions[(directions["scope"] == "global") & directions["chosen"]].iloc[0]


def independence_directions(directions: pd.DataFrame, alpha: float | None) -> dict[str, SiteDirection]:
    """The chosen global direction and every category direction at its layer, each added there."""
    layer = int(chosen_direction(directions)["layer"])
    at_layer = directions[(directions["layer"] == layer) & ((directions["scope"] != "global") | directions["chosen"])]
    return {str(row.scope): SiteDirection(np.asarray(row.vector, dtype=np.float32), layer, alpha)
            for row in at_layer.sort_values("scope", key=lambda s: s != "global", kind="stable").itertuples()}


def tradeoff_points(directions: pd.DataFrame, candidates: pd.DataFrame) -> list[AblationPoint]:
    """The points for a study's `refusal_directions` and `direction_candidates` (the studied model's)."""
    def vector(row: Any) -> np.ndarray:
        return np.asarray(row.vector, dtype=np.float32)

    global_rows = directions[directions["scope"] == "global"].set_index("layer")
    chosen = chosen_direction(directions)
    layer, position = int(chosen["layer"]), int(chosen["position"])
    points = [AblationPoint("weight", w, vector(chosen)[None], weight=w, sites=f"layer {layer}")
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
    version = 5
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
                "addition_strengths": ADDITION_STRENGTHS, "ce_prompts": CE_PROMPTS,
                "answer_prompts": ANSWER_PROMPTS, "eval_max_new_tokens": config.directions.eval_max_new_tokens,
                **({"rdo_steps": config.directions.rdo_steps, "rdo_prompts": RDO_PROMPTS}
                   if config.directions.rdo_steps else {})}

    @staticmethod
    def _rdo_points(model: Any, train: pd.DataFrame, directions: pd.DataFrame, token_ids: list[int],
                    context: StageContext) -> list[AblationPoint]:
        """RDO's cones of k = 1..4 directions, fitted on train-split prompts (a seeded sample of each kind)."""
        settings = context.config.directions
        assert settings is not None
        chosen = chosen_direction(directions)
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
        prompts = context.table("prompts")
        test = prompts.query("split == 'test'")
        model = config.generation.load(config.models[role])
        token_ids = refusal_token_ids(context.table("refusal_tokens"), role)
        batch_size = config.generation.batch_size
        chosen = chosen_direction(directions)
        vector, layer = np.asarray(chosen["vector"], np.float32), int(chosen["layer"])
        answered = context.table("generations").query("model == @role").set_index("prompt_id")["response"]
        ce_sample = seeded_sample(test, "safe", CE_PROMPTS, settings.seed)
        own_answers = OwnAnswers(ce_sample["text"].tolist(), answered.loc[ce_sample["id"]].tolist())
        inputs = self.inputs(config)
        upstream = {name: context.hashes[name] for name in self.upstream}
        rdo_keys = ("rdo_steps", "rdo_prompts") if settings.rdo_steps else ()  # the parts RDO's results enter

        def part(name: str, make: Callable[[], dict[str, pd.DataFrame]], *keys: str) -> dict[str, pd.DataFrame]:
            """`make()`'s frames, cached under the upstream stages and the settings `keys` it reads."""
            key = {"part": name, "upstream": upstream, **{k: inputs[k] for k in ("model", "dtype", "batch_size", *keys)}}
            return cached_frames(context.cache(self.name, key), make)

        def points() -> list[AblationPoint]:
            found = tradeoff_points(directions, candidates)
            if settings.rdo_steps:
                found += self._rdo_points(model, prompts.query("split == 'train'"), directions, token_ids, context)
            return found

        def ablation() -> dict[str, pd.DataFrame]:
            measured = points()
            per_prompt = ablation_tradeoff(model, measured, list(test.loc[test["kind"] == "toxic", "text"]),
                                           list(test.loc[test["kind"] == "safe", "text"]), token_ids,
                                           batch_size=batch_size, own_answers=own_answers)
            return {"table": tradeoff_table(per_prompt, measured, n_boot=settings.bootstrap, seed=settings.seed),
                    "directions": pd.DataFrame({"point": [p.label for p in measured],
                                                "weight": [p.weight for p in measured],
                                                "vectors": [p.directions.tolist() for p in measured]})}

        def independence() -> dict[str, pd.DataFrame]:
            sample = seeded_texts(test, "safe", INDEPENDENCE_PROMPTS, settings.seed)
            sites = independence_directions(directions, settings.addition_alpha)
            optimised = ablated["directions"].query("point == 'rdo 1'")
            if len(optimised):
                # RDO's direction is a unit vector: added at the chosen direction's norm, like the others' scale.
                found = np.asarray(optimised["vectors"].iloc[0][0], np.float32)
                sites["rdo"] = SiteDirection(found / np.linalg.norm(found) * np.linalg.norm(vector), layer,
                                             settings.addition_alpha)
            return {"table": independence_matrix(model, sites, sample, token_ids, batch_size=batch_size,
                                                 n_boot=settings.bootstrap, seed=settings.seed)}

        def addition() -> dict[str, pd.DataFrame]:
            sweep = addition_sweep(model, vector, layer, ADDITION_STRENGTHS,
                                   {kind: test.loc[test["kind"] == kind, "text"].tolist() for kind in KINDS
                                    if (test["kind"] == kind).any()},
                                   token_ids, batch_size=batch_size, own_answers=own_answers)
            return {"table": addition_table(sweep, n_boot=settings.bootstrap, seed=settings.seed)}

        ablated = part("ablation", ablation, "weights", "cone_sizes", "bootstrap", "seed", "ce_prompts", *rdo_keys)

        def answers() -> dict[str, pd.DataFrame]:
            conditions: list[tuple[str, list[Hook], tuple[str, ...]]] = [
                (row.point, ablation_hooks(model, torch.from_numpy(np.stack(row.vectors).astype(np.float32)),
                                             float(row.weight)),
                 ABLATION_ANSWER_KINDS) for row in rows_of(ablated["directions"])]
            norm = float(np.linalg.norm(vector))
            conditions += [(point_label("strength", strength),
                            addition_hooks(model, torch.from_numpy(vector), layer, strength * norm) if strength else [],
                            ADDITION_ANSWER_KINDS) for strength in ADDITION_STRENGTHS]
            frames: list[pd.DataFrame] = []
            for point, hooks, kinds in conditions:
                sample = pd.concat([seeded_sample(test, kind, ANSWER_PROMPTS, settings.seed) for kind in kinds])
                frames.append(judged_answers(model, sample, point, hooks, token_ids,
                                             max_new_tokens=settings.eval_max_new_tokens, batch_size=batch_size)
                              .assign(kind=sample["kind"].to_numpy(), prompt=sample["text"].to_numpy(),
                                      sweep="addition" if point.startswith("strength") else "ablation"))
            return {"table": pd.concat(frames, ignore_index=True).rename(columns={"condition": "point"})}

        tables = {
            "ablation_tradeoff": ablated["table"],
            "direction_independence": part("independence", independence, "addition_alpha", "independence_prompts",
                                           "bootstrap", "seed", *rdo_keys)["table"],
            "addition_tradeoff": part("addition", addition, "addition_strengths", "bootstrap", "seed",
                                      "ce_prompts")["table"],
            "tradeoff_answers": part("answers", answers, "weights", "cone_sizes", "addition_strengths",
                                     "answer_prompts", "eval_max_new_tokens", "seed", *rdo_keys)["table"],
        }
        return StageOutput(tables={name: table.assign(model=role) for name, table in tables.items()},
                           models=(config.models[role],))
