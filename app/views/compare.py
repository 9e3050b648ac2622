"""Compare studies: two stores' refusal rates, directions and verdicts side by side (e.g. the CPU
demo against a study built on a GPU and copied into data/stores/)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import figures
from app.components import show_chart, show_table
from app.context import current_store, known_stores, require_tables
from app.findings import comparison_table, current_findings

st.title("Compare studies")
store = current_store()
choices = list(dict.fromkeys(str(path.resolve()) for path in [store, *known_stores()]))
if len(choices) < 2:
    st.info(
        f"Only one study store is available (`{store}`). To compare, copy another store (for example one "
        "built on a GPU cluster) into `data/stores/`, or build a second study with its own config and "
        "`--store data/stores/<name>.duckdb`.")
    st.stop()

left, right = st.columns(2)
first = left.selectbox("Study A", choices, index=0, format_func=lambda path: Path(path).stem)
second = right.selectbox("Study B", [c for c in choices if c != first], index=0,
                         format_func=lambda path: Path(path).stem)
for path in (first, second):
    require_tables(Path(path), ("prompts",))
studies = {Path(first).stem: current_findings(Path(first)), Path(second).stem: current_findings(Path(second))}

st.caption("Rates are on each study's own test split with Wilson 95% intervals; verdict ratios carry "
           "bootstrap 95% intervals. A dash: that study has not built the stage.")
show_table(comparison_table(studies), "study comparison", hide_index=True, width="stretch")

if all(s.refusal for s in studies.values()):
    show_chart(figures.refusal_by_kind(studies), "refusal rates of two studies", width="stretch")
verdicts = [(name, v) for name, s in studies.items() for v in s.verdicts]
if verdicts:
    show_chart(figures.verdict_evidence(tuple(v for _, v in verdicts), tuple(name for name, _ in verdicts)),
               "verdicts of two studies", width="stretch")
