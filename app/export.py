"""Figures and tables as files: chart specs to PNG/SVG through vl-convert (offline, no browser),
data frames to CSV. Pure functions, so the download buttons and the report share them."""

from __future__ import annotations

import json
import re
from typing import Any

import altair as alt
import pandas as pd
import vl_convert as vlc
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.elements.vega_charts import AltairChart, _convert_altair_to_vega_lite_spec

PNG_SCALE = 2.0  # twice the on-screen size: sharp on projectors and in slides
EXPORT_WIDTH = 720  # charts drawn "stretch" on a page have no width of their own in the spec

ChartSpec = dict[str, Any]  # a Vega-Lite spec whose datasets are Arrow IPC bytes, as Streamlit draws it


def chart_spec(chart: AltairChart) -> ChartSpec:
    """The spec `st.altair_chart` would draw for `chart` (Streamlit, pinned, converts under its own
    lock on Altair's process-wide theme and data transformer). Building and validating it takes
    50-300 ms; the spec itself is plain data, cheap to cache, draw and export.

    Datasets are named by position, not by Streamlit's content hash: a chart redrawn with other data
    then has the same spec, and the browser swaps its data in instead of rebuilding the chart (which
    was most of an interaction's time)."""
    spec = _convert_altair_to_vega_lite_spec(chart)
    datasets = spec.pop("datasets", {})
    names = {name: f"data-{index}" for index, name in enumerate(datasets)}
    text = json.dumps(spec)
    for hashed, positional in names.items():
        text = text.replace(f'"{hashed}"', f'"{positional}"')
    return {**json.loads(text), "datasets": {names[name]: data for name, data in datasets.items()}}


def _export_json(spec: ChartSpec) -> str:
    """The spec with its datasets inline (vl-convert has no Arrow reader) and a width for single
    views drawn to the page's width."""
    datasets = {name: data if not isinstance(data, bytes)
                else alt.to_values(convert_arrow_bytes_to_pandas_df(data))["values"]
                for name, data in spec.get("datasets", {}).items()}
    spec = {**spec, "datasets": datasets}
    single_view = "mark" in spec or "layer" in spec
    if single_view and spec.get("width") in (None, "container"):
        spec["width"] = EXPORT_WIDTH
    return json.dumps(spec)


def chart_svg(spec: ChartSpec) -> str:
    return vlc.vegalite_to_svg(_export_json(spec))


def chart_png(spec: ChartSpec, scale: float = PNG_SCALE) -> bytes:
    return vlc.vegalite_to_png(_export_json(spec), scale=scale)


def table_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode("utf-8")


def file_stem(title: str) -> str:
    """A safe file name from a figure or table title: 'Toxic vs safe (L22)' -> 'toxic-vs-safe-l22'."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "figure"
