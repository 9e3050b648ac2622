"""Directions: which refusal direction was chosen, what it does causally, and how the
categories' directions relate."""

from __future__ import annotations

import streamlit as st
from streamlit.typing import VegaLiteState

from app import charts, queries
from app.classroom import masked_answers
from app.components import figure_spec, show_chart, show_table
from app.context import classroom_mode, current_store, require_tables
from app.findings import ABLATED_TARGET
from app.narrative import answer_ce_text
from engine.data.schema import KINDS

store = current_store()
st.title("Refusal directions")
present = require_tables(store, ("direction_candidates", "direction_effects", "layer_separation", "category_cosines",
                       "cross_ablation", "direction_projections", "direction_harmlessness",
                       "hard_prompt_direction", "cross_ablation_specificity"))

candidates = queries.query(store, queries.CANDIDATES_SQL)
# Template tokens repeat (two "\n" tokens), so a position is named by its index and its token.
candidates["position_name"] = candidates["position"].astype(str) + " · " + candidates["position_label"]
position_order = list(dict.fromkeys(candidates.sort_values("position")["position_name"]))
chosen = candidates[candidates["chosen"]].iloc[0]
effects = queries.query(store, queries.EFFECTS_SQL, (chosen.model,))
harmlessness = queries.query(store, queries.HARMLESSNESS_SQL, (chosen.model,)).set_index("condition")


def rate(condition: str, kind: str) -> tuple[float, int, int]:
    rows = effects[(effects["condition"] == condition) & (effects["kind"] == kind)]
    return rows["n_refused"].sum() / max(rows["n"].sum(), 1), int(rows["n_refused"].sum()), int(rows["n"].sum())


st.caption(
    f"Difference of mean activations (toxic minus safe, train split) in `blocks.{int(chosen.layer)}."
    f"hook_resid_pre` at the prompt position `{chosen.position_label}` of model **{chosen.model}**, "
    "chosen among all candidates by the Arditi et al. (2024) rule; effects measured on the test split."
)
base_toxic, abl_toxic = rate("baseline", "toxic"), rate("ablation", "toxic")
base_safe, add_safe = rate("baseline", "safe"), rate("addition", "safe")
cols = st.columns(4)
cols[0].metric("Chosen layer / position", f"{int(chosen.layer)} / {chosen.position_label}",
               help=f"position {int(chosen.position)} of the prompt-end positions (0 = last instruction token)")
cols[1].metric("Toxic refused, ablated", f"{abl_toxic[0]:.0%}", f"{abl_toxic[0] - base_toxic[0]:+.0%} vs baseline",
               delta_color="inverse", help=f"{abl_toxic[1]} of {abl_toxic[2]} (baseline {base_toxic[1]} of {base_toxic[2]})")
cols[2].metric("Safe refused, direction added", f"{add_safe[0]:.0%}", f"{add_safe[0] - base_safe[0]:+.0%} vs baseline",
               delta_color="off", help=f"{add_safe[1]} of {add_safe[2]} (baseline {base_safe[1]} of {base_safe[2]})")
ablated = harmlessness.loc["ablation"]
cols[3].metric("KL on safe prompts, ablated", f"{ablated.mean_kl:.3f}",
               help=f"mean over {ablated.n} safe test prompts (median {ablated.median_kl:.3f}); "
                    f"{ablated.mean_kl_not_leaning:.3f} on the {ablated.n_not_leaning} the model does not lean to "
                    "refuse (refusal score < 0, the prompts the direction was chosen on, as in Arditi et al.): on "
                    "the others ablation also undoes the refusal. "
                    f"Cross-entropy of safe completions {harmlessness.loc['baseline', 'mean_cross_entropy']:.2f} -> "
                    f"{ablated.mean_cross_entropy:.2f} nats/token under ablation.")

summary = queries.query(store, queries.EFFECT_SUMMARY_SQL)
st.caption("Every model, with its own difference-of-means direction at the same layer and position, over "
           "the same prompts (only the studied model's was chosen by search):")
show_table(summary, "Direction effects by model", hide_index=True, width="stretch", column_config={
    "kl_ablated": st.column_config.NumberColumn("KL on safe, ablated", format="%.3f"),
    "kl_ablated_not_leaning": st.column_config.NumberColumn("KL, safe not leaning to refuse", format="%.3f"),
    "n_not_leaning": st.column_config.NumberColumn("safe not leaning to refuse"),
    "n_kl": st.column_config.NumberColumn("safe prompts")})

@st.fragment  # recolouring reruns only this chart
def candidate_heatmap() -> None:
    st.subheader("Every candidate")
    metric = st.radio("Colour by", ["ablation_score", "induce_score", "kl"], horizontal=True,
                      captions=["refusal score on toxic prompts, direction ablated (low = bypass)",
                                "refusal score on safe prompts, direction added (high = induces refusal)",
                                "KL on safe prompts under ablation (low = harmless)"])
    show_chart(figure_spec(charts.candidate_heatmap, candidates, metric, position_order),
               f"Direction candidates by {metric}", data=candidates, width="stretch",
               height=22 * len(position_order) + 90)
    st.caption("Red diamond: the chosen candidate. Hover a cell for its scores and, if rejected, why. "
               "Layers in the last part of the model are not scored (the rule excludes them).")


candidate_heatmap()

effects = effects.assign(label=effects["n_refused"].astype(str) + " / " + effects["n"].astype(str))
@st.fragment  # switching the kind reruns only this chart
def effects_by_category() -> None:
    st.subheader("Bypass and induced refusal, by category")
    kinds = st.segmented_control("Prompts", list(KINDS), default="toxic", key="effects_kind") or "toxic"
    shown = effects[effects["kind"] == kinds]
    show_chart(figure_spec(charts.rate_bars, shown, "category", "condition", charts.CONDITION_COLORS),
               f"Refusal rate of {kinds} prompts by category and condition", data=shown, width="stretch")


effects_by_category()

@st.fragment  # a click on a point reruns only this section
def tradeoff_section() -> None:
    st.subheader("Can ablation remove refusal, and at what cost? Cones, weights and strengths")
    if "ablation_tradeoff" not in present:
        st.info("The `tradeoff` stage has not run yet: it measures ablation weights, multi-direction cones and "
                "addition strengths.")
        return
    tradeoff = queries.query(store, queries.TRADEOFF_SQL, (chosen.model,))
    sweep = queries.query(store, queries.ADDITION_TRADEOFF_SQL, (chosen.model,))
    max_kl = float(tradeoff["max_kl"].iloc[0])
    state = show_chart(figure_spec(charts.tradeoff_explorer, tradeoff.drop(columns="max_kl"), sweep, max_kl,
                                   ABLATED_TARGET),
                       "Refusal against side effects", data=tradeoff, key="tradeoff_explorer",
                       on_select="rerun", selection_mode=charts.TRADEOFF_PICK)
    best = tradeoff[tradeoff["mean_kl"] <= max_kl].nsmallest(1, "rate")
    within = (f"Within KL {max_kl:g} the fewest toxic prompts still refused is {best['rate'].iloc[0]:.0%} "
              f"({best['point'].iloc[0]}: {best['sites'].iloc[0]})."
              if len(best) else f"No ablation measured here stays within KL {max_kl:g}.")
    safe = sweep[sweep["kind"] == "safe"].set_index("strength")
    st.caption(
        "**Left**, each point ablates a span of directions at every layer and position, on the test prompts: "
        "**weight** w removes that share of the chosen direction (w = 1 is the ablation above); **cone** k removes "
        "the span of the k layers' directions at the chosen position that scored best on the validation prompts "
        "(among those whose addition induces refusal); **categories** removes the span of every category's "
        "direction; **rdo** k the span refusal direction optimisation found on train prompts. Refusal is read by "
        "the refusal score (> 0), the side effect is the KL of the next-token distribution on safe prompts (the "
        "cross-entropy of the model's own answers to them on hover: does the ablation damage what it says?); "
        f"whiskers are Wilson and bootstrap 95% intervals, diamonds the Pareto front. {within} **Right**, the "
        "chosen direction added at its layer with a strength times its own norm (1 is the addition above, 0 the "
        f"unsteered model); bands are Wilson 95% intervals; at strength 1 the KL on safe prompts is "
        f"{safe.at[1.0, 'mean_kl']:.3f} [{safe.at[1.0, 'kl_low']:.3f}, {safe.at[1.0, 'kl_high']:.3f}]"
        f"{answer_ce_text(safe, 1.0)}. This "
        "tests Wollschläger et al. (ICML 2025)'s claim that refusal is mediated by a multi-dimensional cone rather "
        "than one direction: a cone that removes refusal where single directions do not supports it here; that "
        "it costs more KL says the removed span also carries other information. Refusal that rises on safe and "
        "hard prompts as fast as on toxic ones means the direction writes refusal itself, not harm.")
    if "tradeoff_answers" not in present:
        return
    selected = state.selection.get(charts.TRADEOFF_PICK, []) if isinstance(state, VegaLiteState) else []
    point = selected[0]["point"] if selected else "weight 1"
    answers = queries.query(store, queries.TRADEOFF_ANSWERS_SQL, (chosen.model, point))
    st.markdown(f"**Answers at {point}** (click a point above to see another; a seeded sample of test prompts, "
                "greedy answers judged by the substring judge)")
    if classroom_mode():
        answers = masked_answers(answers)
    show_table(answers, f"Answers at {point}", key="tradeoff_answers", hide_index=True, width="stretch",
               column_config={"refusal_score": st.column_config.NumberColumn(format="%.2f")})


tradeoff_section()

st.subheader("Where is harmfulness linearly readable?")
separation = queries.query(store, queries.SEPARATION_SQL)
left, right = st.columns(2)
for column, field, title in ((left, "separation_sigma", "separation (sigma), held out"),
                             (right, "probe_accuracy", "linear probe accuracy, held out")):
    with column:
        show_chart(figure_spec(charts.by_layer, separation, field, title), f"Harmfulness {field} by layer",
                   data=separation, width="stretch")

@st.fragment  # picking a category reruns only this chart
def projection_histograms() -> None:
    st.subheader("Projections on the refusal direction (test split)")
    category = st.selectbox("Category", ["all", *sorted(effects["category"].unique().tolist())], key="projection_category")
    projections = queries.query(store, queries.PROJECTIONS_SQL, (category, category))
    show_chart(figure_spec(charts.projection_histograms, projections),
               f"Projections on the refusal direction, {category}", data=projections)


projection_histograms()

st.subheader("How do the categories' directions relate?")
st.caption("Geometry (left) and function (right) can disagree: category directions may point apart yet each "
           "remove every category's refusal when ablated (Joad et al. 2026). Harm recognition at the instruction's "
           "last token can differ by category while the refusal after it does not (Zhao et al. 2025).")


@st.fragment  # picking a variant reruns only this chart
def category_geometry() -> None:
    cosines = queries.query(store, queries.COSINES_SQL)
    variant = st.radio("Category directions", list(dict.fromkeys(cosines["variant"])), horizontal=True,
                       key="cosine_variant",
                       help="each category's fit-split toxic prompts minus a baseline, at the chosen layer; "
                            "'global direction removed' projects the study's refusal direction out first")
    shown = cosines[cosines["variant"] == variant]
    show_chart(figure_spec(charts.category_cosines, shown), f"Cosine of category directions, {variant}", data=shown,
               width="stretch")


cross = queries.query(store, queries.CROSS_ABLATION_SQL)
left, right = st.columns(2)
with left:
    category_geometry()
order = ["none", "global", *sorted(c for c in cross["ablated"].unique() if c not in ("none", "global"))]
with right:
    show_chart(figure_spec(charts.cross_ablation, cross, order), "Cross-ablation of category directions", data=cross,
               width="stretch")
    specificity = queries.query(store, queries.SPECIFICITY_SQL).iloc[0]
    st.metric("Own-category specificity", f"{specificity.difference:+.2f}",
              help="mean drop in a toxic test prompt's refusal score when its own category's direction is ablated, "
                   "minus the mean drop when another category's is; 0 means the directions are interchangeable")
    st.caption(f"Own direction ablated: refusal score drops {specificity.own_drop:.2f}; another category's: "
               f"{specificity.other_drop:.2f}. Difference {specificity.difference:+.2f}, 95% bootstrap CI "
               f"[{specificity.ci_low:+.2f}, {specificity.ci_high:+.2f}] over {int(specificity.n_prompts)} toxic test "
               "prompts. An interval that excludes 0 means category-specific function; one that includes 0 does not "
               "show the directions are the same, only that this test cannot tell them apart.")

if "direction_independence" in present:
    st.markdown("**Distinct or redundant? Representational independence** (Wollschläger et al. 2025)")
    independence = queries.query(store, queries.INDEPENDENCE_SQL, (chosen.model,))
    names = ["global", *sorted(n for n in independence["b"].unique() if n != "global")]
    show_chart(figure_spec(charts.independence_matrix, independence, names), "Independence of refusal directions",
               data=independence, width="stretch")
    off = independence[independence["a"] != independence["b"]]
    st.caption(
        f"Each direction added at the chosen layer induces refusal on {int(independence['n'].max())} safe test "
        "prompts; a cell is the share of that induced refusal (column) that ablating another direction everywhere "
        "(row) removes: 0 means the two act independently, 1 that one is the other read again (the diagonal is 1 "
        f"by construction). Off the diagonal: median {off['dependence'].median():.2f}, range "
        f"{off['dependence'].min():.2f} to {off['dependence'].max():.2f}; 95% bootstrap intervals on hover.")

hard = queries.query(store, queries.HARD_DIRECTION_SQL).iloc[0]
st.subheader("Refused vs answered hard prompts")
if hard.note:
    st.info(f"Not computed: {hard.note} ({hard.n_refused} refused, {hard.n_answered} answered).")
else:
    st.metric("Cosine with the refusal direction", f"{hard.cosine_with_global:.2f}",
              help=f"95% bootstrap CI [{hard.ci_low:.2f}, {hard.ci_high:.2f}]; {hard.n_refused} refused and "
                   f"{hard.n_answered} answered hard (safe-but-sounds-harmful) test prompts")
    st.caption(f"95% CI [{hard.ci_low:.2f}, {hard.ci_high:.2f}] from {hard.n_refused} refused and "
               f"{hard.n_answered} answered hard prompts: how much over-refusal uses the same direction.")

st.subheader("Is the refusal direction a phrasing detector?")
if "form_probe" not in present:
    st.info("This store was built before the surface-form probe; re-run the `directions` stage to add it.")
else:
    form = queries.query(store, queries.FORM_PROBE_SQL).iloc[0]
    left, right = st.columns(2)
    left.metric("Cosine: form direction vs refusal direction", f"{form.cosine_with_refusal:.2f}",
                help=f"95% bootstrap CI [{form.ci_low:.2f}, {form.ci_high:.2f}]")
    right.metric("Form probe accuracy (held out)", f"{form.probe_accuracy:.0%}",
                 help="balanced accuracy of a logistic probe for imperative vs question; chance is 50%")
    st.caption(
        f"On benign prompts only ({form.n_imperative} imperatives such as \"Write ...\", {form.n_question} "
        f"questions), at the chosen site (layer {form.layer}): the difference of means imperative minus question "
        f"is the surface-form direction; its cosine with the refusal direction is "
        f"{form.cosine_with_refusal:.2f} (95% CI [{form.ci_low:.2f}, {form.ci_high:.2f}]). Near zero means the "
        "refusal direction does not read how a prompt is phrased; a large cosine means part of it is a detector "
        "of the imperative form, which a model tuned on harmful instructions and harmless questions can learn. "
        "The probe accuracy says how readable the form is at this site at all.")
