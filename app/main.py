"""Streamlit entry point: `python -m app -- --store data/stores/demo.duckdb` (or `streamlit run app/main.py -- ...`)."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import streamlit as st

from app.context import PRESENTATION_CSS, PRESENTATION_KEY, current_store, known_stores, presentation_mode

st.set_page_config(page_title="Refusal Circuit Explorer", layout="wide")
# Altair's debug mode validates every channel and chart against the Vega-Lite JSON schema as it is
# built; profiling showed that was most of each chart-heavy interaction. export.chart_spec still
# validates the finished chart once, so a malformed chart still fails (and the tests render them all).
alt.utils.schemapi.disable_debug_mode()

store = current_store()
with st.sidebar:
    choices = list(dict.fromkeys(str(path.resolve()) for path in [store, *known_stores()]))
    stems = [Path(choice).stem for choice in choices]
    # Streamlit keeps a selectbox's choice by its label: two stores named alike get their full path.
    labels = {choice: stem if stems.count(stem) == 1 else choice for choice, stem in zip(choices, stems, strict=True)}
    picked = st.selectbox("Study store", choices, index=0, format_func=labels.get,
                          help="Stores live in data/stores/; build one with `python -m precompute run`.")
    st.session_state["store_path"] = picked
    st.caption(f"`{picked}`")
    st.toggle("Presentation mode", key=PRESENTATION_KEY,
              help="Larger type for a projector; the Findings page shows one section per screen.")
if presentation_mode():
    st.html(PRESENTATION_CSS)

page = st.navigation([
    st.Page("views/findings.py", title="Findings", icon=":material/lightbulb:", default=True),
    st.Page("views/overview.py", title="Overview", icon=":material/bar_chart:"),
    st.Page("views/directions.py", title="Directions", icon=":material/explore:"),
    st.Page("views/features.py", title="Features", icon=":material/hub:"),
    st.Page("views/circuits.py", title="Circuits", icon=":material/account_tree:"),
    st.Page("views/steering.py", title="Steering", icon=":material/tune:"),
    st.Page("views/prompts.py", title="Prompts", icon=":material/list:"),
    st.Page("views/compare.py", title="Compare studies", icon=":material/compare_arrows:"),
])
page.run()
