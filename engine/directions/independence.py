"""Representational independence of refusal directions (Wollschläger et al., ICML 2025).

Two directions can both mediate refusal and still be one mechanism read twice: removing one then
removes the other's effect. For directions a and b, adding b to the residual stream induces refusal on
safe prompts; the dependence of b on a is the share of that induced refusal that is gone when a is
ablated everywhere:

    dependence(a -> b) = 1 - mean(s[+b, -a] - s[-a]) / mean(s[+b] - s[])

with s the refusal score (log-odds of the refusal tokens at the first answer position) per prompt,
each difference taken against the baseline under the same ablation. 0: ablating a leaves b's effect
whole (independent); 1: it removes it (redundant). Intervals come from a bootstrap over prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from engine.judging.judge import refusal_score
from engine.runtime.interventions import applied
from engine.runtime.models import LoadedModel
from engine.runtime.scoring import next_token_logprobs
from engine.steering.spec import Addition, Steering


@dataclass(frozen=True)
class SiteDirection:
    """A direction and the layer where adding it induces refusal."""

    vector: np.ndarray  # [d_model]
    layer: int
    alpha: float | None = None  # None: the vector's own norm


def dependence(induced: np.ndarray, induced_without: np.ndarray) -> float:
    """1 - (b's induced refusal with a ablated) / (b's induced refusal); NaN when b induces nothing."""
    whole = float(np.mean(induced))
    return 1.0 - float(np.mean(induced_without)) / whole if abs(whole) > 1e-9 else float("nan")


def independence_matrix(model: LoadedModel, directions: Mapping[str, SiteDirection], prompts: Sequence[str],
                        token_ids: Sequence[int], *, batch_size: int, n_boot: int = 200,
                        seed: int = 0) -> pd.DataFrame:
    """dependence(a -> b) for every ordered pair (a ablated, b added), with a bootstrap 95% interval over
    prompts; rows a, b, dependence, ci_low, ci_high, induced (b's mean induced score), n."""
    names = list(directions)
    # One forward pass per steering: the baseline, each ablation, each addition alone and under each ablation.
    bar = tqdm(total=1 + 2 * len(names) + len(names) ** 2, desc="independence", unit="pass")

    def scores(steering: Steering) -> np.ndarray:
        with applied(model, steering.hooks(model)):
            score = refusal_score(next_token_logprobs(model, list(prompts), batch_size=batch_size, token_ids=token_ids))
        bar.update(1)
        return score

    baseline = scores(Steering())
    ablated = {a: scores(Steering(ablate=(directions[a].vector,))) for a in names}

    def added(b: str, ablate: tuple[np.ndarray, ...] = ()) -> np.ndarray:
        site = directions[b]
        return scores(Steering(ablate=ablate, add=(Addition(site.vector, site.layer, site.alpha),)))

    induced = {b: added(b) - baseline for b in names}
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(prompts), size=(n_boot, len(prompts)))
    rows = []
    for a in names:
        for b in names:
            without = added(b, (directions[a].vector,)) - ablated[a]
            boot = [dependence(induced[b][draw], without[draw]) for draw in draws]
            low, high = np.nanpercentile(boot, [2.5, 97.5]) if np.isfinite(boot).any() else (np.nan, np.nan)
            rows.append({"a": a, "b": b, "dependence": dependence(induced[b], without), "ci_low": float(low),
                         "ci_high": float(high), "induced": float(np.mean(induced[b])), "n": len(prompts)})
    bar.close()
    return pd.DataFrame(rows)
