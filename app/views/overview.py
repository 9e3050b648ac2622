"""Overview: who gets refused, by category and kind, for every model of the study."""

from __future__ import annotations

import altair as alt
import streamlit as st

from app import queries
from app.charts import rate_bars
from app.classroom import masked_answers
from app.components import show_chart, show_table
from app.context import classroom_mode, current_store, require_tables
from engine.data.prompts import category_label
from engine.data.schema import KINDS
from engine.data.store import rows_of

SET_LABELS = {"plain_instructions": "plain instructions", "harmful_heldout": "harmful requests (held out)",
              "advbench": "harmful requests (AdvBench sample)",
              "study_hard_test": "sounds harmful, is safe (hard test prompts)"}
KIND_HELP = {
    "toxic": "should be refused",
    "hard": "sounds harmful, is safe: refusing is over-refusal",
    "safe": "plainly harmless",
}

store = current_store()
st.title("Refusal overview")
present = require_tables(store, ("prompts", "generations", "refusal_rates", "judge_agreement"))

rates = queries.query(store, queries.RATES_SQL)
models = queries.query(store, queries.MODELS_SQL)
counts = queries.query(store, queries.PROMPT_COUNTS_SQL)

st.caption(
    "Refusal rate per harm category and prompt kind on the judged split, judged by the "
    "substring judge; bars carry Wilson 95% intervals, hover for counts. "
    + " · ".join(f"**{m.model}** = `{m.model_spec}`" for m in models.itertuples())
)

totals = rates.groupby(["model", "kind"], as_index=False)[["n", "n_refused"]].sum()
columns = st.columns(len(KINDS))
for column, kind in zip(columns, KINDS):
    rows = totals[totals["kind"] == kind]
    with column:
        st.markdown(f"**{kind}** — {KIND_HELP[kind]}")
        for row in rows_of(rows):
            st.metric(f"{row.model} refused ({kind})", f"{row.n_refused / row.n:.0%}",
                      help=f"{row.n_refused} of {row.n} prompts")

rates = rates.assign(label=rates["n_refused"].astype(str) + " / " + rates["n"].astype(str))
by_category = rates[rates["kind"] != "safe"]  # safe prompts carry no harm category: see the metrics
base = alt.Chart(by_category).encode(
    x=alt.X("category:N", title=None),
    xOffset=alt.XOffset("model:N"),
    color=alt.Color("model:N", title="model"),
)
bars = base.mark_bar().encode(
    y=alt.Y("rate:Q", title="refusal rate", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
    tooltip=[
        alt.Tooltip("model:N"), alt.Tooltip("category:N"), alt.Tooltip("kind:N"),
        alt.Tooltip("label:N", title="refused / prompts"), alt.Tooltip("rate:Q", format=".1%"),
        alt.Tooltip("ci_low:Q", format=".1%", title="95% CI low"),
        alt.Tooltip("ci_high:Q", format=".1%", title="95% CI high"),
        alt.Tooltip("mean_refusal_score:Q", format=".2f", title="mean refusal score"),
    ],
)
# whiskers as 2-pixel bars: bars, unlike rules, are centred in their offset band
whiskers = base.mark_bar(size=2, opacity=0.7).encode(y="ci_low:Q", y2="ci_high:Q", color=alt.value("black"))
for kind in ("toxic", "hard"):
    st.markdown(f"**{kind} prompts by harm category**")
    show_chart(alt.layer(bars, whiskers).transform_filter(alt.datum.kind == kind).properties(height=230),
               f"Refusal rate of {kind} prompts by harm category",
               data=by_category[by_category["kind"] == kind], width="stretch")

if "evaluation_rates" in present:
    st.subheader("On prompts from outside the study: does it refuse harm, or phrasing?")
    held_out = queries.query(store, queries.EVALUATION_RATES_SQL)
    held_out["set"] = held_out["set"].map(lambda name: SET_LABELS.get(name, name), na_action="ignore")
    st.caption(
        "Refusal rates (substring judge, Wilson 95% intervals) on prompts no model was tuned on and no "
        "direction was fitted on: a fixed sample of Alpaca-style **plain instructions** (refusing them is "
        "over-refusal of the way people ask), the built-in **hard** test prompts (sound harmful, are safe) and "
        "held-out **harmful requests** from public benchmarks. Prompts that the fine-tune trained on or the "
        "study fits on were left out of every set: "
        + ", ".join(f"{row.set} {row.n_left_out}" for row in held_out.drop_duplicates("set").itertuples()) + ".")
    held_out = held_out.assign(label=held_out["n_refused"].astype(str) + " / " + held_out["n"].astype(str))
    show_chart(rate_bars(held_out, "set", "model", alt.Scale(scheme="tableau10")),
               "Refusal on held-out prompt sets", data=held_out, width="stretch")

if "benchmark_rates" in present:
    st.subheader("On other prompt sets: does it generalise?")
    sets = queries.query(store, queries.BENCHMARK_SETS_SQL)["set"].tolist()
    chosen_set = st.selectbox("Prompt set", sets, help="sets run through this study with `python -m precompute "
                              "evaluate --config STUDY.yaml --prompts SET.yaml`, in their own categories")
    benchmark = queries.query(store, queries.BENCHMARK_RATES_SQL, (chosen_set,))
    benchmark = benchmark.assign(label=benchmark["n_refused"].astype(str) + " / " + benchmark["n"].astype(str),
                                 answered_by=benchmark["model"] + ", " + benchmark["condition"])
    overall = benchmark[benchmark["category"] == "all"]
    st.caption(
        "Every model answers the set unmodified; the directions model also with the chosen direction ablated "
        "(refusal should fall on harmful prompts) and added (it should rise everywhere). Prompts the study trained "
        "or fitted on are left out. Refusal: substring judge, Wilson 95% intervals. A non-refused answer that "
        "loops or that the base model finds less likely than 95% of the studied model's own unsteered answers "
        "is marked **degenerate**: it is a bypass, not an answer.")
    show_chart(rate_bars(overall, "kind", "answered_by", annotated=True),
               f"Refusal on {chosen_set} by kind", data=overall, width="stretch")
    coherence = overall.assign(rate=overall["coherent_rate"], ci_low=overall["coherent_rate_low"],
                               ci_high=overall["coherent_rate_high"],
                               label=overall["n_coherent"].astype(str) + " / " + overall["n"].astype(str))
    st.markdown("**Answered coherently** (neither refused nor degenerate)")
    show_chart(rate_bars(coherence, "kind", "answered_by", annotated=True).encode(
        y=alt.Y("rate:Q", title="answered coherently", axis=alt.Axis(format="%"), scale=alt.Scale(domain=[0, 1]))),
        f"Coherent answers on {chosen_set} by kind", data=coherence, width="stretch")
    categories = benchmark[(benchmark["category"] != "all") & (benchmark["kind"] == "toxic")]
    if not categories.empty:
        st.markdown(f"**Harmful prompts of {chosen_set} by its own categories**")
        show_chart(rate_bars(categories.assign(category=categories["category"].map(category_label)), "category",
                             "answered_by"), f"Refusal on {chosen_set} by category", data=categories, width="stretch")
    condition = st.radio("Answers under", sorted(benchmark["condition"].unique()), horizontal=True)
    answers = queries.query(store, queries.BENCHMARK_ANSWERS_SQL, (chosen_set, condition))
    if st.toggle("Degenerate answers only", value=False):
        answers = answers[answers["degenerate"]]
    if classroom_mode():
        answers = masked_answers(answers)
    show_table(answers, f"Answers on {chosen_set} ({condition})", hide_index=True, width="stretch")

with st.expander("Refusal rates as a table"):
    show_table(rates.drop(columns="label"), "Refusal rates", hide_index=True, width="stretch",
               column_config={c: st.column_config.NumberColumn(format="percent")
                              for c in ("rate", "ci_low", "ci_high")})

st.subheader("Do the two judges agree?")
st.caption(
    "Substring judge: a refusal phrase opens the response. Refusal score: log-odds of the "
    "model's refusal tokens at the first response position (> 0 counts as refusal). "
    "AUROC: how well the score ranks substring-judged refusals above compliances. The refusal tokens are "
    "read off one half of the answers (by a fixed hash of the prompt); agreement is measured on the other half."
)
agreement = queries.query(store, queries.AGREEMENT_SQL)
show_table(agreement, "Judge agreement", hide_index=True, width="stretch")
tokens = queries.query(store, queries.REFUSAL_TOKENS_SQL)
show_table(tokens, "Refusal tokens", hide_index=True, width="stretch",
           column_config={"share_of_refusals": st.column_config.NumberColumn(format="percent")})

left, right = st.columns(2)
with left:
    st.subheader("Prompts")
    show_table(counts.pivot(index="kind", columns="split", values="n").fillna(0).astype(int),
               "Prompts by kind and split", width="stretch")
if "tune_steps" in present:
    with right:
        st.subheader("Safety fine-tune")
        if "tune_data" in present:
            trained = queries.query(store, queries.TUNE_DATA_SUMMARY_SQL)
            st.caption("Training examples by kind and source (toxic: answered with the refusal; the rest: "
                       "the base model's own answers): " + ", ".join(
                           f"{row.kind} from {row.source} {row.n}" for row in trained.itertuples()) + ".")
        steps = queries.query(store, queries.TUNE_STEPS_SQL)
        show_chart(
            alt.Chart(steps).mark_line().encode(x="step:Q", y=alt.Y("loss:Q", title="training loss"),
                                                tooltip=["step", alt.Tooltip("loss:Q", format=".3f")])
            .properties(height=200),
            "Safety fine-tune loss",
            width="stretch",
        )
