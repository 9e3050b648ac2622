"""The Findings figures as pure functions of `Findings`: the page, presentation mode and the report
draw the same charts."""

from __future__ import annotations

from collections.abc import Mapping

import altair as alt
import pandas as pd

from app.charts import rate_bars, unfaceted
from app.findings import DirectionFinding, Findings, Rate, SharedFeature, VerdictFinding
from engine.data.schema import KINDS

TOXIC_ABLATED, SAFE_ADDED = "toxic prompts, direction ablated", "safe prompts, direction added"


def _rate_row(rate: Rate, **labels: str) -> dict:
    low, high = rate.interval
    return {**labels, "rate": rate.rate, "ci_low": low, "ci_high": high, "label": f"{rate.refused} / {rate.n}"}


def refusal_by_kind(studies: Mapping[str, Findings]) -> alt.LayerChart:
    """One study's models side by side, or several studies' (then each bar is "study name: model")."""
    several = len(studies) > 1
    rows = [_rate_row(model.by_kind[kind], kind=kind, model=f"{name}: {model.model}" if several else model.model)
            for name, study in studies.items() for model in study.refusal for kind in KINDS if kind in model.by_kind]
    return rate_bars(pd.DataFrame(rows), "kind", "model", annotated=True).properties(
        title="Refusal rate by prompt kind (test split, Wilson 95% CI)")


def direction_effect(direction: DirectionFinding) -> alt.LayerChart:
    rows = [
        _rate_row(direction.toxic_baseline, prompts=TOXIC_ABLATED, condition="no intervention"),
        _rate_row(direction.toxic_ablated, prompts=TOXIC_ABLATED, condition="with intervention"),
        _rate_row(direction.safe_baseline, prompts=SAFE_ADDED, condition="no intervention"),
        _rate_row(direction.safe_added, prompts=SAFE_ADDED, condition="with intervention"),
    ]
    return rate_bars(pd.DataFrame(rows), "prompts", "condition", annotated=True).properties(
        title=f"Refusal under the layer-{direction.layer} direction ({direction.model} model)")


def verdict_evidence(verdicts: tuple[VerdictFinding, ...], names: tuple[str, ...] = ()) -> alt.LayerChart:
    """Each kind's between-category similarity as a share of the split-half ceiling, with its 95% CI,
    against the verdict bands; `names` label the rows when verdicts come from several studies."""
    frame = pd.DataFrame([{
        "kind": f"{name}: {v.kind}" if name else v.kind, "ratio": v.ratio, "low": v.ratio_low, "high": v.ratio_high, "label": v.label,
        "between": v.between, "ceiling": v.ceiling, "p": v.p_value, "share": v.category_share,
    } for v, name in zip(verdicts, names or ("",) * len(verdicts), strict=True)])
    first = verdicts[0]
    bands = pd.DataFrame([
        {"start": 0.0, "end": first.modular_ratio, "band": "modular"},
        {"start": first.modular_ratio, "end": first.monolithic_ratio, "band": "partially modular"},
        {"start": first.monolithic_ratio, "end": 1.1, "band": "monolithic"},
    ])
    scale = alt.Scale(domain=[0, 1.1], clamp=True)
    band_layer = alt.Chart(bands).mark_rect(opacity=0.12).encode(
        x=alt.X("start:Q", scale=scale, title="between-category similarity / within-category ceiling",
                axis=alt.Axis(tickCount=11)),
        x2="end:Q", color=alt.Color("band:N", title="verdict band",
                                    scale=alt.Scale(domain=["modular", "partially modular", "monolithic"],
                                                    range=["#1f77b4", "#9467bd", "#d62728"])))
    base = alt.Chart(frame).encode(y=alt.Y("kind:N", title=None, sort=list(frame["kind"])))
    tooltip = [alt.Tooltip("kind:N"), alt.Tooltip("label:N", title="verdict"),
               alt.Tooltip("share:Q", format=".2f", title="category-specific share q"),
               alt.Tooltip("ratio:Q", format=".2f"), alt.Tooltip("low:Q", format=".2f", title="95% CI low"),
               alt.Tooltip("high:Q", format=".2f", title="95% CI high"),
               alt.Tooltip("between:Q", format=".2f", title="mean cosine between categories"),
               alt.Tooltip("ceiling:Q", format=".2f", title="within-category ceiling"),
               alt.Tooltip("p:Q", format=".3f", title="permutation p")]
    interval = base.mark_rule(strokeWidth=3).encode(x=alt.X("low:Q", scale=scale), x2="high:Q", tooltip=tooltip)
    point = base.mark_point(filled=True, size=140, color="black").encode(x=alt.X("ratio:Q", scale=scale),
                                                                         tooltip=tooltip)
    text = base.mark_text(dy=-16, fontSize=12).encode(x=alt.X("ratio:Q", scale=scale), text="label:N")
    return unfaceted(alt.layer(band_layer, interval, point, text)).properties(
        height=70 * len(frame) + 40, title="Is refusal one mechanism? (point: estimate, line: 95% CI)")


def shared_features(shared: tuple[SharedFeature, ...]) -> alt.Chart:
    frame = pd.DataFrame([{
        "node": (f"error @ {s.hook}" if s.feature < 0 else f"{s.feature} @ L{s.hook.split('.')[1]}  {s.top_tokens}"),
        "effect": s.mean_effect, "circuits": s.n_circuits, "refusal_cosine": s.refusal_cosine,
    } for s in shared])
    return alt.Chart(frame, title="Strongest shared refusal features (mean effect on the refusal metric)").mark_bar().encode(
        x=alt.X("effect:Q", title="mean attribution to the refusal metric"),
        y=alt.Y("node:N", sort="-x", title=None),
        color=alt.condition(alt.datum.effect > 0, alt.value("#d62728"), alt.value("#1f77b4")),
        tooltip=["node:N", alt.Tooltip("effect:Q", format="+.3f"), alt.Tooltip("circuits:Q", title="in circuits"),
                 alt.Tooltip("refusal_cosine:Q", format=".2f", title="cosine with refusal direction")],
    ).properties(height=36 * len(frame) + 30)
