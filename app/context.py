"""Which study store the app shows, and the shared "what is missing and how to build it" message."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
from pathlib import Path

import streamlit as st

from app import queries
from engine.data.paths import stores_dir
from engine.data.schema import TABLE_STAGE
from engine.errors import ExplorerError
from precompute.progress import read_progress

STORE_ENV = "REFUSAL_EXPLORER_STORE"
PRESENTATION_KEY = "presentation"
CLASSROOM_KEY = "classroom"
# Presentation mode: room-sized type for a projector; charts get their own larger fonts (see views).
PRESENTATION_CSS = """<style>
.stMainBlockContainer p, .stMainBlockContainer li, .stMainBlockContainer button p { font-size: 1.45rem !important; }
.stMainBlockContainer h1 { font-size: 3.2rem !important; }
.stMainBlockContainer h2, .stMainBlockContainer h3 { font-size: 2.4rem !important; }
[data-testid="stMetricValue"] { font-size: 3.2rem !important; }
[data-testid="stMetricLabel"] p { font-size: 1.3rem !important; }
</style>"""
BUILD_COMMAND = "python -m precompute run --config precompute/configs/demo.yaml"
# Set by a page drawn while the build has not made its tables yet: the sidebar reruns it when a stage lands.
FOLLOW_BUILD_KEY = "follow_build"


def store_from_argv(argv: list[str] | None = None) -> Path | None:
    """`streamlit run app/main.py -- --store PATH` passes PATH here (the script's arguments, by default
    its own `sys.argv`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store", type=Path)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.store


def known_stores() -> list[Path]:
    return sorted(stores_dir().glob("*.duckdb"))


def default_store(argv: list[str] | None = None) -> Path:
    """--store, else $REFUSAL_EXPLORER_STORE, else the demo study."""
    return Path(store_from_argv(argv) or os.environ.get(STORE_ENV) or stores_dir() / "demo.duckdb")


def current_store() -> Path:
    """The chosen store: the sidebar's choice, else the default."""
    chosen = st.session_state.get("store_path")
    return Path(chosen) if chosen else default_store()


def presentation_mode() -> bool:
    return bool(st.session_state.get(PRESENTATION_KEY, False))


def classroom_mode() -> bool:
    """Mask harmful completions (app.classroom); switched on with presentation mode, off by the user."""
    return bool(st.session_state.get(CLASSROOM_KEY, False))


def presentation_switched() -> None:
    """Presentation mode turns classroom-safe answers on (the user can switch them off again)."""
    if st.session_state.get(PRESENTATION_KEY):
        st.session_state[CLASSROOM_KEY] = True


def awaiting_build(path: Path, stages: list[str]) -> bool:
    """If a build of the store is running and will make `stages`: say so, follow the build (the page reruns
    when a stage lands) and return True."""
    build = read_progress(path)
    if build is None or not build.running or not set(stages) <= set(build.pending()):
        return False
    st.session_state[FOLLOW_BUILD_KEY] = True
    when = "is running now" if build.current in stages else f"runs after `{build.current}`" if build.current else "runs"
    st.info(f"This page needs stage {', '.join(f'`{stage}`' for stage in stages)}, which the build running in the "
            f"background {when}: the page fills in when it lands (progress in the sidebar).",
            icon=":material/hourglass_top:")
    return True


def require_tables(path: Path, needed: tuple[str, ...]) -> frozenset[str]:
    """Stop the page with a clear message when the store or some of its tables are missing: which stage
    makes them and, if a build is running, that the page fills in when it lands."""
    if not path.is_file():
        if awaiting_build(path, ["prompts"]):
            st.stop()
        st.info(
            f"No study store at `{path}` yet. Build the embedded demo study (on a 2-core CPU: about "
            f"45-50 minutes with bfloat16 support, well over an hour without; the README has the figures) "
            f"with:\n\n```\n{BUILD_COMMAND}\n```\n\nor run `make demo`."
        )
        st.stop()
    try:
        present = queries.tables(path)
    except ExplorerError as exc:
        st.error(f"{exc.problem} Fix: {exc.fix}")
        st.stop()
    missing = [name for name in needed if name not in present]
    if missing:
        stages = sorted({TABLE_STAGE.get(name, "?") for name in missing})
        if awaiting_build(path, stages):
            st.stop()
        st.warning(
            f"This store lacks {', '.join(missing)} (stage {', '.join(stages)} has not run). "
            f"Build the rest with:\n\n```\n{BUILD_COMMAND}\n```"
        )
        st.stop()
    return present


IMPORT_DELAY = 2.0  # seconds: a reader looks at the page longer than this before generating


@st.cache_resource(show_spinner=False)
def warm_model_stack() -> threading.Thread:
    """Import torch, TransformerLens and SAELens once per server, in the background, when the model will
    be needed soon: once Steering is drawn, or when Features' own-text box is edited. The reader is
    still choosing a prompt or writing when they are needed. Not on every page, nor before a page is
    drawn: the import thread's hold on the GIL doubled a page's time. It starts `IMPORT_DELAY` seconds
    later, once the page's last messages are out (they need the GIL too)."""
    thread = threading.Timer(IMPORT_DELAY, importlib.import_module, args=("app.resources",))
    thread.daemon = True
    thread.start()
    return thread
