"""Prompt browser: every prompt, each model's answer and both judges' verdicts."""

from __future__ import annotations

import streamlit as st
from streamlit.typing import DataframeState

from app import queries
from app.classroom import is_harmful_compliance, masked, masked_answers
from app.components import show_table
from app.context import classroom_mode, current_store, require_tables
from app.judges import JUDGES, judge_agreement_matrix
from engine.data.schema import KINDS
from engine.data.store import rows_of

MAX_ROWS = 500
store = current_store()
st.title("Prompt browser")
require_tables(store, ("prompts", "generations"))

categories = queries.query(store, queries.CATEGORIES_SQL)["category"].tolist()
with st.form("filters", border=False):
    left, middle, right = st.columns([2, 1, 1])
    picked_categories = left.multiselect("Category", categories, default=categories)
    picked_kinds = middle.multiselect("Kind", list(KINDS), default=list(KINDS))
    picked_splits = right.multiselect("Split", ["train", "test"], default=["test"],
                                      help="Generations exist for the judged split (test in the demo).")
    search = st.text_input("Search prompt text", "")
    st.form_submit_button("Filter")

rows = queries.query(
    store, queries.BROWSE_SQL,
    (tuple(picked_categories), tuple(picked_kinds), tuple(picked_splits), search.strip(), MAX_ROWS),
)
st.caption(f"{len(rows)} prompts shown (at most {MAX_ROWS}). Select a row to see the answers.")
selection = show_table(
    rows.drop(columns="id"), "Prompts", hide_index=True, width="stretch", height=320,
    on_select="rerun", selection_mode="single-row", key="prompt_table",
)
with st.expander("Where the judges disagree", expanded=False):
    st.caption("Every judge's verdict on each answer side by side, under the filters above. Disagreements are "
               "where a phrase list and the model's own refusal tokens read an answer differently: refusals "
               "without a listed phrase, clarifying questions, late disclaimers. Kappa: agreement beyond chance "
               "(1 = perfect, 0 = chance).")
    labels = queries.query(store, queries.JUDGE_LABELS_SQL, (tuple(picked_categories), tuple(picked_kinds),
                                                             tuple(picked_splits), search.strip()))
    show_table(judge_agreement_matrix(labels), "Judge agreement (Cohen's kappa per pair)", hide_index=True,
               width="stretch", column_config={"agree": st.column_config.NumberColumn(format="percent"),
                                               "Cohen's kappa": st.column_config.NumberColumn(format="%.2f")})
    disagree = labels[labels[list(JUDGES.values())].nunique(axis=1) > 1]
    only = st.toggle("Only answers the judges disagree on", value=True)
    shown = disagree if only else labels
    if classroom_mode():
        shown = masked_answers(shown, refused="substring_judge")
    st.caption(f"{len(disagree)} of {len(labels)} answers split the judges.")
    show_table(shown.head(MAX_ROWS), "Judge labels per answer", hide_index=True, width="stretch", height=280)

picked_rows = selection.selection.rows if isinstance(selection, DataframeState) else []
if not picked_rows:
    st.info("Select a prompt above to read each model's answer.")
    st.stop()

prompt = rows.iloc[picked_rows[0]]
st.markdown(f"#### {prompt.text}")
st.caption(f"`{prompt.id}` · category **{prompt.category}** · kind **{prompt.kind}** · split {prompt.split}")
answers = queries.query(store, queries.PROMPT_GENERATIONS_SQL, (prompt.id,))
if answers.empty:
    st.info("No generations for this prompt (only the configured splits are generated).")
for column, answer in zip(st.columns(max(len(answers), 1)), rows_of(answers)):
    with column:
        verdict = "refused" if answer.refused else "complied"
        st.markdown(f"**{answer.model}** (`{answer.model_spec}`, {answer.condition})")
        st.markdown(f"Substring judge: **{verdict}** · refusal score **{answer.refusal_score:+.2f}**"
                    f" ({'refusal' if answer.refused_by_score else 'compliance'} by score)")
        if classroom_mode() and is_harmful_compliance(prompt.kind, answer.refused):
            st.text(masked(answer.response))
            with st.expander("Reveal this answer"):
                st.text(answer.response)
        else:
            st.text(answer.response)
