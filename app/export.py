"""Figures and tables as files: Altair charts to PNG/SVG through vl-convert (offline, no browser),
data frames to CSV. Pure functions, so the download buttons and the report share them."""

from __future__ import annotations

import json
import re

import altair as alt
import pandas as pd
import vl_convert as vlc
from streamlit.elements.vega_charts import _altair_globals_lock

PNG_SCALE = 2.0  # twice the on-screen size: sharp on projectors and in slides
EXPORT_WIDTH = 720  # charts drawn "stretch" on a page have no width of their own in the spec


def _spec(chart: alt.TopLevelMixin) -> str:
    # Altair's data transformer is process-wide. Streamlit (pinned; the lock is private) swaps in its
    # own (data by reference, no values) under this lock while it draws a chart, and a download
    # converts on another thread. The default transformer, without its 5000-row limit, inlines the data.
    with _altair_globals_lock, alt.data_transformers.enable("default", max_rows=None):
        spec = chart.to_dict()
    single_view = "mark" in spec or "layer" in spec
    if single_view and spec.get("width") in (None, "container"):
        spec["width"] = EXPORT_WIDTH
    return json.dumps(spec)


def chart_svg(chart: alt.TopLevelMixin) -> str:
    return vlc.vegalite_to_svg(_spec(chart))


def chart_png(chart: alt.TopLevelMixin, scale: float = PNG_SCALE) -> bytes:
    return vlc.vegalite_to_png(_spec(chart), scale=scale)


def table_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode("utf-8")


def file_stem(title: str) -> str:
    """A safe file name from a figure or table title: 'Toxic vs safe (L22)' -> 'toxic-vs-safe-l22'."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "figure"
