"""Charts as PNG/SVG and tables as CSV: the export functions, and the download buttons the pages render."""

from __future__ import annotations

import io
import json
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import altair as alt
import pandas as pd
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from app.export import EXPORT_WIDTH, PNG_SCALE, chart_png, chart_spec, chart_svg, file_stem, table_csv

APP = Path(__file__).resolve().parents[1] / "app"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PAGES = ["overview", "directions", "features", "circuits", "steering", "prompts"]

RATES = pd.DataFrame({"category": ["hate", "privacy", "self-harm"], "rate": [0.9, 0.25, 0.5]})
BARS = alt.Chart(RATES).mark_bar().encode(x="category:N", y="rate:Q")
CHARTS = {
    "plain": BARS,
    "layered": BARS + alt.Chart(pd.DataFrame({"rate": [0.5]})).mark_rule().encode(y="rate:Q"),
    "hconcat": alt.hconcat(BARS, alt.Chart(RATES).mark_point().encode(x="rate:Q", y="category:N")),
}


def test_chart_spec_names_datasets_by_position_so_new_data_keep_the_spec() -> None:
    from app import charts

    # the browser swaps the data of a chart whose spec is unchanged instead of rebuilding it
    def layered(rates: pd.DataFrame) -> alt.LayerChart:
        return alt.Chart(rates).mark_bar().encode(x="category:N", y="rate:Q") + alt.Chart(
            pd.DataFrame({"rate": [0.5]})).mark_rule().encode(y="rate:Q")

    first, second = chart_spec(layered(RATES)), chart_spec(layered(RATES.assign(rate=[0.1, 0.2, 0.3])))
    assert sorted(first["datasets"]) == ["data-0", "data-1"]
    assert [layer["data"] for layer in first["layer"]] == [{"name": "data-0"}, {"name": "data-1"}]
    assert first["datasets"]["data-0"] != second["datasets"]["data-0"]
    assert {k: v for k, v in first.items() if k != "datasets"} == {k: v for k, v in second.items() if k != "datasets"}
    # the faithfulness chart marks its highlighted category in the data, not in the spec
    curves = pd.DataFrame({"category": ["hate", "hate", "privacy", "privacy"], "n_nodes": [10, 30, 10, 30],
                           "faithfulness": [0.4, 0.8, 0.5, 0.9], "metric": 0.0, "metric_full": 1.0, "metric_empty": 0.0})
    hate, privacy = (chart_spec(charts.faithfulness_curves(curves, c, 0.6)) for c in ("hate", "privacy"))
    assert {k: v for k, v in hate.items() if k != "datasets"} == {k: v for k, v in privacy.items() if k != "datasets"}
    assert hate["datasets"] != privacy["datasets"]


def _svg_root(svg: str) -> str:
    return ET.fromstring(svg).tag.rsplit("}", 1)[-1]


@pytest.mark.parametrize("name", CHARTS)
def test_chart_png_is_a_png(name: str) -> None:
    png = chart_png(chart_spec(CHARTS[name]))
    assert png.startswith(PNG_SIGNATURE)
    width, _ = struct.unpack(">II", png[16:24])  # the IHDR chunk
    if name != "hconcat":  # a single view without a width of its own is drawn EXPORT_WIDTH wide
        assert width >= PNG_SCALE * EXPORT_WIDTH


@pytest.mark.parametrize("name", CHARTS)
def test_chart_svg_is_an_svg(name: str) -> None:
    assert _svg_root(chart_svg(chart_spec(CHARTS[name]))) == "svg"


def test_export_ignores_the_active_data_transformer_and_row_limit() -> None:
    # Streamlit swaps in its own transformer while it draws charts; altair's default refuses > 5000 rows.
    many = pd.DataFrame({"x": range(6000), "y": [i % 7 for i in range(6000)]})
    chart = alt.Chart(many).mark_point().encode(x="x:Q", y="y:Q")
    expected = chart_svg(chart_spec(chart))
    alt.data_transformers.register("by_reference", lambda data: {"name": "elsewhere"})
    try:
        with alt.data_transformers.enable("by_reference"):
            assert chart_svg(chart_spec(chart)) == expected
            assert alt.data_transformers.active == "by_reference"
    finally:
        alt.data_transformers.register("by_reference", None)


def test_table_csv_round_trips_through_pandas() -> None:
    frame = pd.DataFrame({"text": ['a, "quoted"\nline', "ünïcode → ok"], "n": [1, 2], "rate": [0.125, float("nan")],
                          "refused": [True, False]})
    pd.testing.assert_frame_equal(pd.read_csv(io.BytesIO(table_csv(frame))), frame)


@pytest.mark.parametrize(("title", "stem"), [
    ("Toxic vs safe (L22)", "toxic-vs-safe-l22"),
    ("blocks.1.hook_resid_pre feature 5 activation histogram", "blocks-1-hook-resid-pre-feature-5-activation-histogram"),
    ("  Faithfulness → size!  ", "faithfulness-size"),
    ("→ ∅", "figure"),
])
def test_file_stem(title: str, stem: str) -> None:
    assert file_stem(title) == stem


@pytest.fixture
def downloads(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The arguments of every `st.download_button` call a page makes (AppTest keeps no file name or data)."""
    calls: list[dict] = []
    draw = st.download_button

    def recording(label: str, data, **kwargs):
        calls.append({"label": label, "data": data, **kwargs})
        return draw(label, data, **kwargs)

    monkeypatch.setattr(st, "download_button", recording)
    return calls


def _page(name: str, store_path: Path) -> AppTest:
    app = AppTest.from_file(str(APP / "views" / f"{name}.py"), default_timeout=60)
    app.session_state["store_path"] = str(store_path)
    return app.run()


def test_overview_offers_its_charts_and_tables_as_files(tiny_store: Path, downloads: list[dict]) -> None:
    app = _page("overview", tiny_store)
    assert not app.exception and not app.error
    buttons = app.download_button
    assert {b.label for b in buttons} == {"↓ PNG", "↓ SVG", "↓ CSV"}
    files = {call["file_name"]: call for call in downloads}
    offered = set(files)
    charts = [f"refusal-rate-of-{kind}-prompts-by-harm-category.{ext}" for kind in ("toxic", "hard")
              for ext in ("png", "svg", "csv")]
    tables = ["refusal-rates.csv", "judge-agreement.csv", "refusal-tokens.csv", "prompts-by-kind-and-split.csv"]
    assert offered >= {*charts, *tables}
    assert buttons(key="download-judge-agreement-csv").label == "↓ CSV"
    assert len(files) == len(buttons)  # one file name per button
    # a pivot's row labels are part of the table
    counts = pd.read_csv(io.BytesIO(files["prompts-by-kind-and-split.csv"]["data"]()))
    assert counts.columns[0] == "kind" and set(counts["kind"]) == {"toxic", "hard", "safe"}
    toxic = pd.read_csv(io.BytesIO(files["refusal-rate-of-toxic-prompts-by-harm-category.csv"]["data"]()))
    assert set(toxic["kind"]) == {"toxic"}  # the chart's own rows, not the other kind's


@pytest.mark.parametrize("page", PAGES)
def test_every_chart_and_table_of_a_page_downloads(page: str, tiny_store: Path, downloads: list[dict]) -> None:
    app = _page(page, tiny_store)
    assert not app.exception and not app.error
    names = [call["file_name"] for call in downloads]
    assert len(app.download_button) == len(downloads) == len(set(names))
    n_charts = len(app.get("vega_lite_chart"))
    assert sum(name.endswith(".png") for name in names) == sum(name.endswith(".svg") for name in names) == n_charts
    assert sum(name.endswith(".csv") for name in names) >= len(app.dataframe)
    for call in downloads:
        # made only when clicked (a PNG takes over a second), and a click does not rerun the page
        assert callable(call["data"]) and call["on_click"] == "ignore"
        if call["file_name"].endswith(".svg"):
            assert _svg_root(call["data"]()) == "svg"
        elif call["file_name"].endswith(".csv"):
            assert len(pd.read_csv(io.BytesIO(call["data"]())).columns) > 0


def test_figure_spec_builds_a_chart_once_per_builder_and_data() -> None:
    from app.components import figure_spec

    calls: list[str] = []

    def bars(frame: pd.DataFrame, colour: str) -> alt.Chart:
        calls.append(colour)
        return alt.Chart(frame).mark_bar(color=colour).encode(x=alt.X("category:N"), y=alt.Y("rate:Q"))

    first = figure_spec(bars, RATES, "red")
    assert figure_spec(bars, RATES.copy(), "red") == first and calls == ["red"]  # equal data: the cached spec
    concatenated = pd.concat([RATES.iloc[:1], RATES.iloc[1:]], ignore_index=True)  # equal, built another way
    assert figure_spec(bars, concatenated, "red") == first and calls == ["red"]
    assert figure_spec(bars, RATES, "blue")["mark"]["color"] == "blue"
    figure_spec(bars, RATES.assign(rate=[0.1, 0.2, 0.3]), "red")
    assert calls == ["red", "blue", "red"]
    assert _svg_root(chart_svg(first)) == "svg"  # a cached spec exports like a fresh one


def test_a_circuit_graph_file_has_the_height_drawn_on_the_page(tiny_store: Path, downloads: list[dict]) -> None:
    from app import charts

    app = _page("circuits", tiny_store)
    app.session_state["circuits_section"] = "One category's circuit"
    app.run()
    assert not app.exception and not app.error
    graph = next(call for call in downloads if call["file_name"].startswith("circuit-graph-")
                 and call["file_name"].endswith(".svg"))
    exported = graph["data"].args[0]
    assert "height" not in next(spec for spec in _drawn_specs(app) if "href" in json.dumps(spec))
    assert exported["height"] >= charts.GRAPH_MIN_PX
    assert float(ET.fromstring(graph["data"]()).get("height")) >= exported["height"]  # plot plus axes


def _drawn_specs(app: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in app.get("vega_lite_chart")]


def test_a_charts_own_height_stays_in_its_files(tiny_store: Path, downloads: list[dict]) -> None:
    # the candidate heatmap's element is taller than its plot (room for the axes): files keep the plot's
    app = _page("directions", tiny_store)
    assert not app.exception and not app.error
    heatmap = next(call for call in downloads if call["file_name"].startswith("direction-candidates-by-")
                   and call["file_name"].endswith(".svg"))
    drawn = next(spec for spec in _drawn_specs(app) if "position_name" in json.dumps(spec))
    n_positions = len(drawn["layer"][0]["encoding"]["y"]["sort"])
    assert heatmap["data"].args[0]["height"] == drawn["height"] == 22 * n_positions
