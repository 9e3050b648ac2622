"""The analysis pages' charts as pure functions of their data. Pages draw them through
`components.figure_spec`, which caches each chart's spec by builder and data, so an interaction
that returns to a view it has shown does not rebuild the chart."""

from __future__ import annotations

from typing import cast

import altair as alt
import numpy as np
import pandas as pd
from altair.utils.schemapi import UndefinedType

from engine.data.schema import KINDS

# One scale for both similarity measures (Jaccard runs 0 to 1, cosine -1 to 1): a measure switch then
# changes only the data, which the browser swaps into the drawn heatmaps instead of building them anew.
SIMILARITY_SCALE = alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True)
CONDITION_COLORS = alt.Scale(domain=["baseline", "ablation", "addition"], range=["#9e9e9e", "#1f77b4", "#d62728"])
PERCENT = alt.Axis(format="%")
LABELLED_ROWS = 12  # heatmaps with more rows than this show their values on hover only
# Channels are written as objects (alt.Tooltip("n"), not "n"): Altair turns each bare string into one
# by rebuilding its whole schema lookup table, ~10 ms a string.


def unfaceted(layers: alt.LayerChart | alt.FacetChart) -> alt.LayerChart:
    """A layering of charts typed as what it is here: Altair types one `LayerChart | FacetChart`, as it
    makes a facet chart when all its layers share a row, column or facet encoding, which none here do."""
    return cast(alt.LayerChart, layers)


# --- Directions -----------------------------------------------------------------------------------
def candidate_heatmap(candidates: pd.DataFrame, metric: str, position_order: list[str]) -> alt.LayerChart:
    """Every (layer, position) candidate coloured by one of its scores, the chosen one marked."""
    heat = alt.Chart(candidates).mark_rect().encode(
        x=alt.X("layer:O", title="layer"),
        y=alt.Y("position_name:N", title="prompt position", sort=position_order, axis=alt.Axis(labelOverlap=False)),
        color=alt.Color(f"{metric}:Q", scale=alt.Scale(scheme="viridis", reverse=metric == "ablation_score")),
        tooltip=[alt.Tooltip("layer"), alt.Tooltip("position_label"), alt.Tooltip("ablation_score:Q", format=".2f"),
                 alt.Tooltip("induce_score:Q", format=".2f"), alt.Tooltip("kl:Q", format=".3f"),
                 alt.Tooltip("eligible"), alt.Tooltip("rejected_because")],
    )
    mark = alt.Chart(candidates[candidates["chosen"]]).mark_point(
        shape="diamond", size=160, color="red", filled=True).encode(
        x=alt.X("layer:O"), y=alt.Y("position_name:N", sort=position_order),
        tooltip=[alt.Tooltip("layer:O", title="chosen layer")])
    return unfaceted(heat + mark).properties(height=22 * len(position_order))


def rate_bars(rates: pd.DataFrame, x: str, group: str, colours: alt.Scale | None = None, *,
              annotated: bool = False) -> alt.LayerChart:
    """Refusal rate (`rate`; `label`: "refused / prompts") by `x`, a bar per `group` beside each other in the
    legend's order, with its Wilson interval (`ci_low`, `ci_high`) as a whisker. `annotated`, for a handful of
    bars: `x` and `group` in the frame's order, horizontal axis labels and each rate written above its whisker;
    otherwise values sort by name, so the spec is the same for any data (the browser swaps new data in)."""
    def in_frame_order(column: str) -> list[str] | UndefinedType:
        return list(dict.fromkeys(rates[column])) if annotated else alt.Undefined

    legend = in_frame_order(group) if colours is None else colours.domain
    base = alt.Chart(rates).encode(
        x=alt.X(f"{x}:N", title=None, sort=in_frame_order(x),
                axis=alt.Axis(labelAngle=0) if annotated else alt.Undefined),
        xOffset=alt.XOffset(f"{group}:N", sort=legend),
        color=alt.Color(f"{group}:N", sort=legend, scale=alt.Undefined if colours is None else colours))
    bars = base.mark_bar().encode(
        y=alt.Y("rate:Q", title="refusal rate", axis=PERCENT, scale=alt.Scale(domain=[0, 1])),
        tooltip=[alt.Tooltip(f"{x}:N"), alt.Tooltip(f"{group}:N"), alt.Tooltip("label:N", title="refused / prompts"),
                 alt.Tooltip("rate:Q", format=".1%"), alt.Tooltip("ci_low:Q", format=".1%", title="95% CI low"),
                 alt.Tooltip("ci_high:Q", format=".1%", title="95% CI high")])
    # Whiskers as 2-pixel bars: bars, unlike rules, are centred in their offset band.
    whiskers = base.mark_bar(size=2, opacity=0.8).encode(y=alt.Y("ci_low:Q"), y2=alt.Y2("ci_high:Q"),
                                                         color=alt.value("black"))
    values = base.mark_text(dy=-8, fontSize=11).encode(y=alt.Y("ci_high:Q"), text=alt.Text("rate:Q", format=".0%"),
                                                       color=alt.value("#333333"))
    return unfaceted(alt.layer(bars, whiskers, *([values] if annotated else []))).properties(height=260)


def by_layer(separation: pd.DataFrame, field: str, title: str) -> alt.Chart:
    """One per-layer statistic as a line per model."""
    return alt.Chart(separation).mark_line(point=True).encode(
        x=alt.X("layer:Q"), y=alt.Y(f"{field}:Q", title=title), color=alt.Color("model:N"),
        tooltip=[alt.Tooltip("model"), alt.Tooltip("layer"), alt.Tooltip(f"{field}:Q", format=".2f")]).properties(height=220)


def projection_histograms(projections: pd.DataFrame) -> alt.Chart:
    """Histograms of the projections on the refusal direction, by kind, one panel per model."""
    return alt.Chart(projections).mark_bar(opacity=0.6).encode(
        x=alt.X("projection:Q", bin=alt.Bin(maxbins=40)), y=alt.Y("count():Q", stack=None),
        color=alt.Color("kind:N", sort=list(KINDS)), column=alt.Column("model:N"),
        tooltip=[alt.Tooltip("kind"), alt.Tooltip("count()")]).properties(height=200, width=320)


# Every category label on every axis (Vega drops every other one when they crowd; a class reading the
# chart from the back of the room needs them all).
ALL_LABELS = alt.Axis(labelOverlap=False, labelLimit=220)


def fitted_domain(values: pd.Series) -> list[float]:
    """The colour domain of a heatmap fitted to its values (a 0.80-0.96 matrix on a 0-1 scale looks
    uniformly dark), widened a little when every value is the same."""
    low, high = float(values.min()), float(values.max())
    return [low - 0.01, high + 0.01] if high - low < 1e-9 else [low, high]


def category_cosines(cosines: pd.DataFrame) -> alt.Chart:
    off_diagonal = cosines.loc[cosines["category_a"] != cosines["category_b"], "cosine"]
    domain = fitted_domain(off_diagonal if len(off_diagonal) else cosines["cosine"])
    return alt.Chart(cosines).mark_rect().encode(
        x=alt.X("category_b:N", title=None, axis=alt.Axis(labelOverlap=False, labelLimit=220, labelAngle=-40)),
        y=alt.Y("category_a:N", title=None, axis=ALL_LABELS),
        color=alt.Color("cosine:Q", scale=alt.Scale(domain=domain, scheme="blues", clamp=True)),
        tooltip=[alt.Tooltip("category_a"), alt.Tooltip("category_b"), alt.Tooltip("cosine:Q", format=".2f"),
                 alt.Tooltip("ci_low:Q", format=".2f", title="95% CI low"),
                 alt.Tooltip("ci_high:Q", format=".2f", title="95% CI high")]).properties(
        title=f"cosine of category directions: colours span the data, {domain[0]:.2f}-{domain[1]:.2f} "
              "(the diagonal, 1, is clamped); bootstrap 95% CI on hover", height=320)


def cross_ablation(cross: pd.DataFrame, order: list[str]) -> alt.Chart:
    return alt.Chart(cross).mark_rect().encode(
        x=alt.X("category:N", title="refusal measured on",
                axis=alt.Axis(labelOverlap=False, labelLimit=220, labelAngle=-40)),
        y=alt.Y("ablated:N", sort=order, title="direction ablated", axis=ALL_LABELS),
        color=alt.Color("refusal_rate_by_score:Q", scale=alt.Scale(domain=[0, 1], scheme="reds")),
        tooltip=[alt.Tooltip("ablated"), alt.Tooltip("category"), alt.Tooltip("n"),
                 alt.Tooltip("refusal_rate_by_score:Q", format=".0%"), alt.Tooltip("mean_refusal_score:Q", format=".2f")]).properties(
        title="cross-ablation: toxic prompts refused (score > 0)", height=320)


def addition_sweep(sweep: pd.DataFrame, picked: alt.Parameter | None = None) -> alt.LayerChart:
    """Refusal (score > 0) on each kind of prompt against the strength of the added direction, Wilson
    intervals as bands; strength 1 is the direction's own norm. `picked`: a click selection of points."""
    base = alt.Chart(sweep).encode(
        x=alt.X("strength:Q", title="strength added (times the direction's norm)"),
        color=alt.Color("kind:N", sort=list(KINDS), title="prompts"))
    band = base.mark_area(opacity=0.15).encode(y=alt.Y("ci_low:Q", title="refused (score > 0)", axis=PERCENT,
                                                       scale=alt.Scale(domain=[0, 1])), y2="ci_high:Q")
    line = base.mark_line(point=alt.OverlayMarkDef(size=70, filled=True)).encode(
        y="rate:Q", tooltip=[alt.Tooltip("point:N"), alt.Tooltip("kind:N"), alt.Tooltip("n_refused:Q", title="refused"),
                             alt.Tooltip("n:Q", title="prompts"), alt.Tooltip("rate:Q", format=".0%"),
                             alt.Tooltip("mean_kl:Q", format=".3f", title="KL on safe prompts"),
                             alt.Tooltip("mean_ce:Q", format=".3f", title="CE of safe answers (nats/token)")])
    if picked is not None:
        line = line.add_params(picked)
    return unfaceted(band + line).properties(height=260,
                                             title="adding the chosen direction: induced refusal by strength")


def independence_matrix(matrix: pd.DataFrame, order: list[str]) -> alt.Chart:
    """dependence(a -> b): the share of b's induced refusal that ablating a removes, 0 (independent) to 1
    (redundant), on a diverging scale around 0.5; the interval on hover."""
    return alt.Chart(matrix).mark_rect().encode(
        x=alt.X("b:N", sort=order, title="direction added", axis=alt.Axis(labelOverlap=False, labelAngle=-40)),
        y=alt.Y("a:N", sort=order, title="direction ablated", axis=ALL_LABELS),
        color=alt.Color("dependence:Q", title="dependence",
                        scale=alt.Scale(domain=[0, 1], scheme="purpleorange", clamp=True)),
        tooltip=[alt.Tooltip("a", title="ablated"), alt.Tooltip("b", title="added"),
                 alt.Tooltip("dependence:Q", format=".2f"), alt.Tooltip("ci_low:Q", format=".2f", title="95% CI low"),
                 alt.Tooltip("ci_high:Q", format=".2f", title="95% CI high"),
                 alt.Tooltip("induced:Q", format=".2f", title="refusal score induced by b alone"),
                 alt.Tooltip("n:Q", title="safe prompts")]).properties(
        title="representational independence: share of b's induced refusal removed by ablating a", height=320)


def ablation_tradeoff(points: pd.DataFrame, max_kl: float, target_rate: float,
                      picked: alt.Parameter | None = None) -> alt.LayerChart:
    """Toxic prompts still refused against the KL on safe prompts, one mark per ablation (weight, cone size,
    category span) with both 95% intervals; the Pareto front as diamonds, the targets as dashed lines.
    `picked`: a click selection of points."""
    frame = points.assign(front=points["pareto"].map({True: "on the front", False: "dominated"}))
    base = alt.Chart(frame).encode(
        # Log KL: a span that breaks the model (KL ~ 9) would otherwise squash the points that matter (0.1-0.5).
        x=alt.X("mean_kl:Q", title="KL on safe prompts (mean, log scale)", scale=alt.Scale(type="log")),
        y=alt.Y("rate:Q", axis=PERCENT, title="toxic prompts still refused", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("source:N", title="ablated", scale=alt.Scale(domain=["weight", "cone", "rdo", "categories"],
                                                                     range=["#d62728", "#1f77b4", "#2ca02c", "#9467bd"])))
    tooltip = [alt.Tooltip("point:N"), alt.Tooltip("sites:N"), alt.Tooltip("rate:Q", format=".0%"),
               alt.Tooltip("ci_low:Q", format=".0%", title="95% CI low"),
               alt.Tooltip("ci_high:Q", format=".0%", title="95% CI high"), alt.Tooltip("n_toxic:Q"),
               alt.Tooltip("mean_kl:Q", format=".3f"), alt.Tooltip("kl_low:Q", format=".3f", title="KL 95% CI low"),
               alt.Tooltip("kl_high:Q", format=".3f", title="KL 95% CI high"), alt.Tooltip("n_safe:Q"),
               alt.Tooltip("mean_ce:Q", format=".3f", title="CE of safe answers (nats/token)"),
               alt.Tooltip("ce_low:Q", format=".3f", title="CE 95% CI low"),
               alt.Tooltip("ce_high:Q", format=".3f", title="CE 95% CI high"),
               alt.Tooltip("baseline_ce:Q", format=".3f", title="CE unablated"),
               alt.Tooltip("front:N", title="Pareto front")]
    marks = base.mark_point(filled=True, size=80).encode(
        shape=alt.Shape("front:N", title="Pareto front", scale=alt.Scale(domain=["on the front", "dominated"],
                                                                         range=["diamond", "circle"])),
        tooltip=tooltip)
    if picked is not None:
        marks = marks.add_params(picked)
    whiskers = base.mark_rule(opacity=0.5).encode(y=alt.Y("ci_low:Q"), y2=alt.Y2("ci_high:Q")) + \
        base.mark_rule(opacity=0.5).encode(x=alt.X("kl_low:Q"), x2=alt.X2("kl_high:Q"))
    labels = base.mark_text(align="left", dx=7, dy=-7, fontSize=10).encode(text="point:N")
    targets = alt.Chart(pd.DataFrame({"kl": [max_kl]})).mark_rule(strokeDash=[4, 4], color="grey").encode(x="kl:Q") + \
        alt.Chart(pd.DataFrame({"rate": [target_rate]})).mark_rule(strokeDash=[4, 4], color="grey").encode(y="rate:Q")
    return unfaceted(whiskers + marks + labels + targets).properties(height=340)


TRADEOFF_PICK = "picked"  # the selection parameter's name: the page reads the clicked point under it


def tradeoff_explorer(ablation: pd.DataFrame, addition: pd.DataFrame, max_kl: float,
                      target_rate: float) -> alt.HConcatChart:
    """Both halves of the trade-off side by side, one click selection over their points (field `point`):
    removing refusal (ablation: toxic prompts still refused against KL) and inducing it (addition: refusal
    by strength)."""
    picked = alt.selection_point(name=TRADEOFF_PICK, fields=["point"], on="click", clear="dblclick")
    removing = ablation_tradeoff(ablation, max_kl, target_rate, picked).properties(
        title="removing refusal: ablation", width=340)
    inducing = addition_sweep(addition, picked).properties(title="inducing refusal: addition", width=300)
    return alt.hconcat(removing, inducing).resolve_scale(color="independent", shape="independent")


# --- Features -------------------------------------------------------------------------------------
def firing_rates(aligned: pd.DataFrame) -> alt.Chart:
    """Toxic and safe firing rates of the given features, side by side, in the frame's order (a column,
    not a list in the spec: another SAE's features redraw the same spec)."""
    frame = aligned.assign(toxic=aligned["toxic_rate"], safe=aligned["safe_rate"], order=range(len(aligned)))
    return alt.Chart(frame).transform_fold(["toxic", "safe"], as_=["prompts", "firing rate"]).mark_bar().encode(
        x=alt.X("feature:N", sort=alt.EncodingSortField("order")), xOffset=alt.XOffset("prompts:N"),
        y=alt.Y("firing rate:Q", axis=PERCENT),
        color=alt.Color("prompts:N", scale=alt.Scale(domain=["toxic", "safe"], range=["#d62728", "#1f77b4"])),
        tooltip=[alt.Tooltip("feature"), alt.Tooltip("prompts:N"), alt.Tooltip("firing rate:Q", format=".1%"),
                 alt.Tooltip("refusal_cosine:Q", format="+.3f"), alt.Tooltip("n_toxic_fired"),
                 alt.Tooltip("n_toxic"), alt.Tooltip("n_safe_fired"), alt.Tooltip("n_safe")]).properties(height=220)


def histogram_bins(counts: list[int], max_activation: float) -> pd.DataFrame:
    """A feature's stored histogram as bins: equal widths from 0 to its maximum activation."""
    edges = np.linspace(0, max_activation or 1.0, len(counts) + 1)
    return pd.DataFrame({"from": edges[:-1], "to": edges[1:], "tokens": counts})


def activation_histogram(bins: pd.DataFrame) -> alt.Chart:
    return alt.Chart(bins).mark_bar().encode(
        x=alt.X("from:Q", bin="binned", title="activation"), x2=alt.X2("to:Q"), y=alt.Y("tokens:Q", title="tokens"),
        tooltip=[alt.Tooltip("from:Q", format=".2f"), alt.Tooltip("to:Q", format=".2f"), alt.Tooltip("tokens")],
    ).properties(height=200)


def activation_by_group(groups: pd.DataFrame) -> alt.Chart:
    return alt.Chart(groups).mark_rect().encode(
        x=alt.X("category:N", title=None, axis=alt.Axis(labelAngle=-30)),
        y=alt.Y("kind:N", sort=list(KINDS), title=None, axis=alt.Axis(labelOverlap=False)),
        color=alt.Color("mean_activation:Q", scale=alt.Scale(scheme="oranges"), title="mean activation"),
        tooltip=[alt.Tooltip("category"), alt.Tooltip("kind"), alt.Tooltip("n"),
                 alt.Tooltip("mean_activation:Q", format=".3f"), alt.Tooltip("firing_rate:Q", format=".0%")],
    ).properties(height=90)


def direction_cosines(cosines: pd.DataFrame) -> alt.Chart:
    return alt.Chart(cosines).mark_bar().encode(
        x=alt.X("scope:N", title="refusal direction", sort=["global"]), y=alt.Y("cosine:Q"),
        color=alt.condition("datum.scope == 'global'", alt.value("#d62728"), alt.value("#7f7f7f")),
        tooltip=[alt.Tooltip("scope"), alt.Tooltip("cosine:Q", format="+.3f")],
    ).properties(height=180)


# --- Circuits -------------------------------------------------------------------------------------
def similarity_heatmap(data: pd.DataFrame, rows: str, columns: str, y_title: str,
                       x_title: str) -> alt.Chart | alt.LayerChart:
    """Pairwise circuit similarity (`value`, of the measure named in `measure`), CIs and p-values on
    hover; values are written in the cells when there are few enough rows to read them (a 30 x 30
    matrix of numbers is noise, and doubles the marks the browser draws)."""
    base = alt.Chart(data).encode(
        x=alt.X(f"{columns}:N", title=x_title, axis=alt.Axis(labelAngle=-40, labelOverlap=False)),
        y=alt.Y(f"{rows}:N", title=y_title, axis=alt.Axis(labelOverlap=False)))
    cells = base.mark_rect().encode(
        color=alt.Color("value:Q", title="similarity", scale=SIMILARITY_SCALE),
        tooltip=[alt.Tooltip("row"), alt.Tooltip("column"), alt.Tooltip("measure:N"),
                 alt.Tooltip("value:Q", format=".3f", title="similarity"),
                 alt.Tooltip("ci:N", title="95% bootstrap range"),
                 alt.Tooltip("p_value:Q", format=".3g", title="permutation p (this pair alone)"),
                 alt.Tooltip("p_holm:Q", format=".3g", title="p, Holm-corrected for all pairs"),
                 alt.Tooltip("n_a:Q", title="prompts (row)"), alt.Tooltip("n_b:Q", title="prompts (column)")])
    if data[rows].nunique() > LABELLED_ROWS:
        return cells
    text = base.mark_text(fontSize=9).encode(
        text=alt.Text("value:Q", format=".2f"),
        color=alt.condition("abs(datum.value) > 0.6", alt.value("white"), alt.value("black")))
    return unfaceted(cells + text)


VERDICT_COLORS = alt.Scale(domain=["monolithic", "partially modular", "modular", "inconclusive"],
                           range=["#d62728", "#9467bd", "#1f77b4", "#bdbdbd"])


def calibration_curve(calibration: pd.DataFrame, detectable: float) -> alt.LayerChart:
    """The rule's verdicts on simulated studies with a planted category share q (the study's sizes
    and noise): a stacked bar of verdict shares per q, the smallest detectable q marked."""
    labels = {"monolithic": "monolithic", "partially_modular": "partially modular", "modular": "modular",
              "inconclusive": "inconclusive"}
    long = calibration.melt(id_vars=["share", "true_ratio", "truth", "n_simulations", "detected"],
                            value_vars=list(labels), var_name="verdict", value_name="fraction")
    long["verdict"] = long["verdict"].map(labels)
    long["order"] = long["verdict"].map({label: i for i, label in enumerate(labels.values())})
    bars = alt.Chart(long).mark_bar().encode(
        x=alt.X("share:O", title="planted category-specific share q"),
        y=alt.Y("fraction:Q", title="share of simulated studies", axis=PERCENT, scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("verdict:N", scale=VERDICT_COLORS, title="verdict"), order=alt.Order("order:Q"),
        tooltip=[alt.Tooltip("share:Q", title="q"), alt.Tooltip("verdict:N"),
                 alt.Tooltip("fraction:Q", format=".0%", title="of simulations"),
                 alt.Tooltip("true_ratio:Q", format=".2f", title="true ratio"),
                 alt.Tooltip("truth:N", title="deserved verdict"), alt.Tooltip("n_simulations:Q", title="simulations")])
    marks = pd.DataFrame({"share": [detectable] if np.isfinite(detectable) else []})
    rule = alt.Chart(marks).mark_rule(strokeDash=[4, 3], color="black", strokeWidth=2).encode(
        x=alt.X("share:O", bandPosition=0.5))
    return unfaceted(alt.layer(bars, rule)).properties(height=260)


def patching_map(patching: pd.DataFrame, rows: str) -> alt.Chart:
    """Share of the toxic-safe gap each site moves, by layer and `rows` (an encoding such as
    "category:N"); sites re-checked by exact patching are outlined."""
    return alt.Chart(patching).mark_rect(stroke="black").encode(
        x=alt.X("layer:O"), y=alt.Y(rows, axis=alt.Axis(labelOverlap=False)),
        color=alt.Color("effect:Q", title="share of gap", scale=alt.Scale(scheme="redblue", reverse=True, domainMid=0)),
        strokeWidth=alt.condition("isValid(datum.exact)", alt.value(2), alt.value(0)),
        tooltip=[alt.Tooltip("category"), alt.Tooltip("component"), alt.Tooltip("layer"), alt.Tooltip("head"),
                 alt.Tooltip("effect:Q", format=".1%", title="attribution"), alt.Tooltip("exact:Q", format=".1%", title="exact"), alt.Tooltip("metric_safe:Q", format="+.2f"),
                 alt.Tooltip("metric_toxic:Q", format="+.2f")])


def faithfulness_curves(curves: pd.DataFrame, highlighted: str, target: float) -> alt.LayerChart:
    """Faithfulness against the number of nodes kept, a line per category, one highlighted (marked in
    the data, so the spec, and the drawn chart, stay the same when another category is picked)."""
    curves = curves.assign(highlighted=curves["category"] == highlighted)
    lines = alt.Chart(curves).mark_line(point=True).encode(
        x=alt.X("n_nodes:Q", scale=alt.Scale(type="log"), title="nodes kept (log)"),
        y=alt.Y("faithfulness:Q", axis=PERCENT),
        color=alt.Color("category:N"),
        opacity=alt.condition("datum.highlighted", alt.value(1.0), alt.value(0.25)),
        tooltip=[alt.Tooltip("category"), alt.Tooltip("n_nodes"), alt.Tooltip("faithfulness:Q", format=".1%"),
                 alt.Tooltip("metric:Q", format="+.2f"), alt.Tooltip("metric_full:Q", format="+.2f"),
                 alt.Tooltip("metric_empty:Q", format="+.2f")])
    target_line = alt.Chart(pd.DataFrame({"faithfulness": [target]})).mark_rule(strokeDash=[4, 4]).encode(
        y=alt.Y("faithfulness:Q"))
    return unfaceted(lines + target_line).properties(height=280)


# --- Steering -------------------------------------------------------------------------------------
STEERING_MODES = alt.Scale(domain=["suppress", "force"], range=["#1f77b4", "#d62728"])


def first_tokens(top: pd.DataFrame) -> alt.Chart:
    """The likeliest first response tokens (`token` as repr, `probability`) of one live answer."""
    return alt.Chart(top).mark_bar().encode(
        x=alt.X("probability:Q", axis=PERCENT, scale=alt.Scale(domain=[0, 1])),
        y=alt.Y("token:N", sort="-x", title=None),
        tooltip=[alt.Tooltip("token"), alt.Tooltip("probability:Q", format=".1%")]).properties(height=180)


def collateral_matrix(cells: pd.DataFrame, order: list[str], target_kind: str) -> alt.Chart:
    """Change in the refusal rate (`change`) of each category's `target_kind` prompts under each intervention."""
    return alt.Chart(cells).mark_rect().encode(
        x=alt.X("category:N", title=f"{target_kind} prompts of category"),
        y=alt.Y("intervention:N", sort=order, title="steered with"),
        color=alt.Color("change:Q", scale=alt.Scale(scheme="redblue", domain=[-1, 1], reverse=True),
                        title="change in refusal rate"),
        tooltip=[alt.Tooltip("intervention"), alt.Tooltip("category"), alt.Tooltip("n"),
                 alt.Tooltip("n_refused_by_score"), alt.Tooltip("rate_by_score:Q", format=".0%"),
                 alt.Tooltip("baseline_rate_by_score:Q", format=".0%"), alt.Tooltip("change:Q", format="+.0%")],
    ).properties(height=24 * len(order))


# --- Circuit graph --------------------------------------------------------------------------------
SIGN_COLORS = alt.Scale(domain=["towards refusal", "away from refusal"], range=["#d62728", "#1f77b4"])
GRAPH_ROW_PX, GRAPH_MIN_PX = 34, 260


def feature_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """hook, feature, label: "promotes a b c · fires on d" from FEATURE_LABELS_SQL's top_tokens and peak_token
    (newlines shown as ⏎ so a label stays on one line)."""
    def shown(token: object) -> str:
        return str(token).replace("\n", "⏎").strip() or repr(str(token))

    text = [f"promotes {tokens.replace(chr(10), '⏎')}" + (f" · fires on {shown(peak)}" if isinstance(peak, str) else "")
            for tokens, peak in zip(labels["top_tokens"].fillna(""), labels["peak_token"], strict=True)]
    return labels[["hook", "feature"]].assign(label=text)


def circuit_layout(nodes: pd.DataFrame, edges: pd.DataFrame, hooks: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Node positions by layer (one column per hook, upstream left; within a column by effect, largest
    on top) and the edges between shown nodes with their end points.

    `nodes`: hook, feature (-1: the SAE error term), effect, effect_se, label; `edges`: upstream_hook,
    upstream_feature, downstream_hook, downstream_feature, effect."""
    placed = nodes.assign(column=nodes["hook"].map({hook: i for i, hook in enumerate(hooks)}))
    placed = placed.sort_values(["column", "effect"], ascending=[True, False])
    placed["row"] = placed.groupby("column").cumcount()
    placed["row"] -= placed.groupby("column")["row"].transform("max") / 2  # columns centred on each other
    placed["kind"] = np.where(placed["feature"] < 0, "SAE error term", "feature")
    placed["name"] = np.where(placed["feature"] < 0, "error", placed["feature"].astype(int).astype(str))
    # The graph reads like a diagram: each feature's id with what it is about (cut to fit beside the node).
    placed["caption"] = [name if not label else f"{name}: {label.removeprefix('promotes ')}"[:48]
                         for name, label in zip(placed["name"], placed.get("label", pd.Series("", index=placed.index))
                                                .fillna(""), strict=True)]
    placed["sign"] = np.where(placed["effect"] > 0, "towards refusal", "away from refusal")
    placed["size"] = placed["effect"].abs()
    placed["dashboard"] = [None if f < 0 else f"features?hook={h}&feature={int(f)}"
                           for h, f in zip(placed["hook"], placed["feature"], strict=True)]
    where = placed.set_index(["hook", "feature"])[["column", "row"]]
    joined = edges.join(where, on=["upstream_hook", "upstream_feature"]).join(
        where.rename(columns={"column": "column_end", "row": "row_end"}), on=["downstream_hook", "downstream_feature"])
    joined = joined.dropna(subset=["column", "column_end"])  # an edge to a node that is not shown
    joined = joined.assign(sign=np.where(joined["effect"] > 0, "towards refusal", "away from refusal"),
                           size=joined["effect"].abs())
    return placed.reset_index(drop=True), joined.reset_index(drop=True)


def circuit_graph(nodes: pd.DataFrame, edges: pd.DataFrame, hooks: list[str]) -> alt.LayerChart:
    """A circuit laid out by layer: node size by |effect|, colour by sign, SAE error terms as squares,
    edges as lines weighted by |effect|; clicking a feature opens its dashboard (`href`)."""
    placed, joined = circuit_layout(nodes, edges, hooks)
    names = "[" + ", ".join(f"'{hook}'" for hook in hooks) + "]"
    x_axis = alt.Axis(values=list(range(len(hooks))), labelExpr=f"{names}[datum.value]", orient="top", title=None,
                      grid=False, labelAngle=0, domain=False, ticks=False, labelLimit=0)
    x_scale = alt.Scale(domain=[-0.2, len(hooks) - 0.6])  # room for the last column's labels
    y = alt.Y("row:Q", axis=None, scale=alt.Scale(reverse=True))
    lines = alt.Chart(joined).mark_rule(opacity=0.55).encode(
        x=alt.X("column:Q", axis=x_axis, scale=x_scale), x2=alt.X2("column_end"), y=y, y2=alt.Y2("row_end"),
        color=alt.Color("sign:N", scale=SIGN_COLORS, title="effect"),
        strokeWidth=alt.StrokeWidth("size:Q", scale=alt.Scale(range=[0.5, 7]), legend=None),
        tooltip=[alt.Tooltip("upstream_hook"), alt.Tooltip("upstream_feature"), alt.Tooltip("downstream_hook"),
                 alt.Tooltip("downstream_feature"), alt.Tooltip("effect:Q", format="+.4f", title="edge effect")])
    points = alt.Chart(placed).mark_point(filled=True, opacity=0.9, cursor="pointer").encode(
        x=alt.X("column:Q", axis=x_axis, scale=x_scale), y=y,
        color=alt.Color("sign:N", scale=SIGN_COLORS, title="effect"),
        shape=alt.Shape("kind:N", scale=alt.Scale(domain=["feature", "SAE error term"], range=["circle", "square"]),
                        title=None),
        size=alt.Size("size:Q", scale=alt.Scale(range=[40, 900]), legend=None),
        href=alt.Href("dashboard:N"),
        tooltip=[alt.Tooltip("hook"), alt.Tooltip("name:N", title="feature"), alt.Tooltip("effect:Q", format="+.4f"),
                 alt.Tooltip("effect_se:Q", format=".4f", title="± s.e."), alt.Tooltip("label:N", title="about")])
    labels = alt.Chart(placed).mark_text(align="left", dx=14, fontSize=11).encode(
        x=alt.X("column:Q", axis=x_axis, scale=x_scale), y=y, text=alt.Text("caption:N"))
    return unfaceted(lines + points + labels)


def circuit_graph_height(nodes: pd.DataFrame) -> int:
    """Pixels for `circuit_graph` of `nodes`: a row per node of the tallest layer. Given to the page
    element, not the spec, so another circuit keeps the spec (its data swapped in the browser)."""
    tallest = int(nodes.groupby("hook").size().max()) if len(nodes) else 1
    return max(GRAPH_MIN_PX, GRAPH_ROW_PX * tallest)
