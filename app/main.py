"""Streamlit entry point: `python -m app -- --store data/stores/demo.duckdb` (or `streamlit run app/main.py -- ...`)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from altair.utils.schemapi import disable_debug_mode

from app.components import build_panel
from app.context import (
    CLASSROOM_KEY,
    FOLLOW_BUILD_KEY,
    PRESENTATION_CSS,
    PRESENTATION_KEY,
    current_store,
    known_stores,
    presentation_mode,
    presentation_switched,
)
from precompute.progress import read_progress

BUILD_REFRESH_SECONDS = 2.0


def file_version(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def build_status(path: Path, drawn_version: int | None) -> None:
    """The build panel, redrawn every few seconds while a build runs (a fragment). When a stage lands, a
    page that waits for the build reruns; any other offers a refresh (a rerun would drop, e.g., a live
    answer on Steering)."""
    progress = read_progress(path)
    if progress is None:
        return
    if file_version(path) != drawn_version and (st.session_state.get(FOLLOW_BUILD_KEY)
                                                or st.button("New results: refresh the page", icon=":material/refresh:")):
        st.rerun()
    build_panel(progress)


st.set_page_config(page_title="Refusal Circuit Explorer", layout="wide")
# Altair's debug mode validates every channel and chart against the Vega-Lite JSON schema as it is
# built; profiling showed that was most of each chart-heavy interaction. export.chart_spec still
# validates the finished chart once, so a malformed chart still fails (and the tests render them all).
disable_debug_mode()

store = current_store()
with st.sidebar:
    choices = list(dict.fromkeys(str(path.resolve()) for path in [store, *known_stores()]))
    stems = [Path(choice).stem for choice in choices]
    # Streamlit keeps a selectbox's choice by its label: two stores named alike get their full path.
    labels = {choice: stem if stems.count(stem) == 1 else choice for choice, stem in zip(choices, stems, strict=True)}
    picked = st.selectbox("Study store", choices, index=0, format_func=labels.__getitem__,
                          help="Stores live in data/stores/; build one with `python -m precompute run`.")
    st.session_state["store_path"] = picked
    st.caption(f"`{picked}`")
    st.toggle("Presentation mode", key=PRESENTATION_KEY, on_change=presentation_switched,
              help="Larger type for a projector; the Findings page shows one section per screen. Switches "
                   "classroom-safe answers on.")
    st.toggle("Classroom-safe answers", key=CLASSROOM_KEY,
              help="Answers to toxic prompts that the judge does not find refused are shown masked (first words "
                   "only); each can be revealed on its own.")
    building = read_progress(Path(picked))
    if building is not None:
        st.fragment(build_status, run_every=BUILD_REFRESH_SECONDS if building.running else None)(
            Path(picked), file_version(Path(picked)))
st.session_state[FOLLOW_BUILD_KEY] = False  # the page sets it again if it waits for the build
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
