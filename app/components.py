"""Small rendering helpers shared by pages: charts and tables with download buttons, and HTML that
Streamlit has no widget for."""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Callable, Sequence
from functools import partial
from types import FunctionType

import altair as alt
import pandas as pd
import pyarrow as pa
import streamlit as st
from streamlit.delta_generator import DeltaGenerator
from streamlit.elements.arrow import DataframeState

from app.export import ChartSpec, chart_png, chart_spec, chart_svg, file_stem, table_csv

# (label, extension, MIME type, what makes the file's contents)
Download = tuple[str, str, str, Callable[[], bytes | str]]


def _download_row(downloads: Sequence[Download], stem: str, key: str) -> None:
    """Compact download buttons in one row. Files are made only when a button is clicked (a PNG takes
    over a second) and a click does not rerun the page (which would lose a generated answer)."""
    with st.container(horizontal=True, gap="small"):
        for label, extension, mime, make in downloads:
            st.download_button(label, make, file_name=f"{stem}.{extension}", mime=mime,
                               key=f"download-{key}-{extension}", help=f"Download {stem}.{extension}",
                               on_click="ignore", type="tertiary", icon=":material/download:")


def _frame_fingerprint(frame: pd.DataFrame) -> str:
    """A data frame's content digest through Arrow (schema, index and values in one contiguous chunk
    each, so equal frames digest alike however they were built or cached): a few times faster than
    Streamlit's hash of arrow-backed string columns, which was a third of a chart-heavy rerun."""
    table = pa.Table.from_pandas(frame, preserve_index=True).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.md5(sink.getvalue(), usedforsecurity=False).hexdigest()


@st.cache_data(show_spinner=False, max_entries=512, hash_funcs={
    FunctionType: lambda build: f"{build.__module__}.{build.__qualname__}", pd.DataFrame: _frame_fingerprint})
def figure_spec(build: Callable[..., alt.TopLevelMixin], *args) -> ChartSpec:
    """`build(*args)` as a drawable spec, cached by builder and arguments: building and validating an
    Altair chart is most of an interaction's time; drawing a cached spec takes a few milliseconds."""
    return chart_spec(build(*args))


def show_chart(chart: alt.TopLevelMixin | ChartSpec, title: str, *, data: pd.DataFrame | None = None,
               key: str | None = None, **chart_kwargs) -> None:
    """A chart (an Altair chart, or a spec from `figure_spec`) with PNG and SVG downloads under it, and
    a CSV of `data` (by default an Altair chart's own data frame, if it has one: layers over several
    frames have none). `title` names the files; `key` (else the title) keys the buttons and is the
    chart's key."""
    spec = chart if isinstance(chart, dict) else chart_spec(chart)
    st.vega_lite_chart(spec=spec, key=key, **chart_kwargs)
    frame = getattr(chart, "data", None) if data is None else data
    downloads: list[Download] = [("PNG", "png", "image/png", partial(chart_png, spec)),
                                 ("SVG", "svg", "image/svg+xml", partial(chart_svg, spec))]
    if isinstance(frame, pd.DataFrame):
        downloads.append(("CSV", "csv", "text/csv", partial(table_csv, frame)))
    stem = file_stem(title)
    _download_row(downloads, stem, key or stem)


def show_table(frame: pd.DataFrame, title: str, *, key: str | None = None,
               **dataframe_kwargs) -> DeltaGenerator | DataframeState:
    """`st.dataframe` with a CSV download under it; returns what `st.dataframe` returns (a selection
    when `on_select` is set). `title` names the file; `key` (else the title) keys the button and is
    the table's key."""
    shown = st.dataframe(frame, key=key, **dataframe_kwargs)
    # Row labels the page shows (a pivot's) belong in the file; a hidden or plain 0..n index does not.
    if not dataframe_kwargs.get("hide_index") and not isinstance(frame.index, pd.RangeIndex):
        frame = frame.reset_index()
    stem = file_stem(title)
    _download_row([("CSV", "csv", "text/csv", partial(table_csv, frame))], stem, key or stem)
    return shown


def highlighted_tokens(tokens: Sequence[str], activations: Sequence[float], scale: float,
                       peak: int | None = None) -> str:
    """Tokens as inline spans shaded by activation / scale (orange), the peak token outlined;
    each span's tooltip gives the exact activation."""
    spans = []
    for index, (token, value) in enumerate(zip(tokens, activations, strict=True)):
        strength = 0.0 if scale <= 0 else min(max(float(value) / scale, 0.0), 1.0)
        outline = "outline:2px solid #d62728;" if index == peak else ""
        text = html.escape(token).replace("\n", "↵<br>")
        spans.append(f'<span title="{float(value):.3f}" style="background:rgba(255,140,0,{strength:.2f});'
                     f'{outline}border-radius:3px;padding:0 1px;white-space:pre-wrap">{text}</span>')
    return '<div style="font-family:monospace;font-size:0.9em;line-height:1.9">' + "".join(spans) + "</div>"


POSITIVE, NEGATIVE = "#d62728", "#1f77b4"  # pushes towards refusal / away from it
_OFFLINE_UNUSED = re.compile(r'<(?:link|script)[^>]*(?:https://cdn\.jsdelivr\.net|node_modules)[^>]*>(?:</script>)?')


def circuit_graph_html(nodes: pd.DataFrame, edges: pd.DataFrame, hooks: Sequence[str], height: int = 560) -> str:
    """A pyvis graph of a circuit laid out by layer: one column per hook (upstream left), node size
    by |effect|, colour by sign, error nodes as grey-bordered boxes; clicking a feature opens its
    dashboard on the Features page. `nodes`: hook, feature (-1 = error), effect, effect_se, label;
    `edges`: upstream_hook, upstream_feature, downstream_hook, downstream_feature, effect."""
    from pyvis.network import Network

    network = Network(height=f"{height}px", width="100%", directed=True, cdn_resources="in_line")
    largest = float(nodes["effect"].abs().max() or 1.0)
    for column, hook in enumerate(hooks):
        here = nodes[nodes["hook"] == hook].sort_values("effect", ascending=False)
        for row_index, node in enumerate(here.itertuples()):
            is_error = int(node.feature) == -1
            colour = POSITIVE if node.effect > 0 else NEGATIVE
            network.add_node(
                f"{hook}:{int(node.feature)}", label=("error" if is_error else f"{int(node.feature)}"),
                title=(f"{hook} {'SAE error term' if is_error else f'feature {int(node.feature)}'}\n"
                       f"effect {node.effect:+.3f} ± {node.effect_se:.3f}\n{node.label}"),
                x=column * 360, y=(row_index - (len(here) - 1) / 2) * 52, physics=False,
                size=8 + 28 * abs(node.effect) / largest, shape="box" if is_error else "dot",
                color={"background": colour, "border": "#555555" if is_error else colour},
                borderWidth=3 if is_error else 1, font={"size": 13},
                url="" if is_error else f"features?hook={hook}&feature={int(node.feature)}")
    widest = float(edges["effect"].abs().max()) if len(edges) else 1.0
    present = set(network.get_nodes())
    for edge in edges.itertuples():
        source = f"{edge.upstream_hook}:{int(edge.upstream_feature)}"
        target = f"{edge.downstream_hook}:{int(edge.downstream_feature)}"
        if source in present and target in present:
            network.add_edge(source, target, width=1 + 7 * abs(edge.effect) / (widest or 1.0),
                             color=POSITIVE if edge.effect > 0 else NEGATIVE, title=f"edge {edge.effect:+.4f}")
    network.toggle_physics(False)
    page = _OFFLINE_UNUSED.sub("", network.generate_html())
    opener = """<script>
network.on("click", function (params) {
  if (!params.nodes.length) { return; }
  var url = nodes.get(params.nodes[0]).url;
  if (!url) { return; }
  var base = "";
  try { base = window.parent.location.origin + "/"; } catch (error) { base = "/"; }
  window.open(base + url, "_blank");
});
</script></body>"""
    return page.replace("</body>", opener, 1)
