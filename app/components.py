"""Small rendering helpers shared by pages: charts and tables with download buttons, and HTML that
Streamlit has no widget for."""

from __future__ import annotations

import hashlib
import html
from collections.abc import Callable, Sequence
from functools import partial
from types import FunctionType
from typing import Any

import pandas as pd
import pyarrow as pa
import streamlit as st
from streamlit.delta_generator import DeltaGenerator
from streamlit.elements.arrow import DataframeState
from streamlit.elements.vega_charts import AltairChart, VegaLiteState

from app.classroom import JUDGE, KEPT_WORDS, is_harmful_compliance
from app.export import ChartSpec, chart_png, chart_spec, chart_svg, file_stem, table_csv
from app.top_texts import WINDOW, peak_window
from engine.data.store import rows_of
from engine.judging.refusal_phrases import is_refusal
from precompute.progress import FAILED, FINISHED, BuildProgress

# (label, extension, MIME type, what makes the file's contents)
Download = tuple[str, str, str, Callable[[], bytes | str]]


def _download_row(downloads: Sequence[Download], stem: str, key: str) -> None:
    """Compact download buttons in one row. Files are made only when a button is clicked (a PNG takes
    over a second) and a click does not rerun the page (which would lose a generated answer). Plain
    text labels: a tooltip and an icon per button made the rows a fifth of a chart-heavy rerun's time
    in the browser."""
    with st.container(horizontal=True, gap="small"):
        for label, extension, mime, make in downloads:
            st.download_button(f"↓ {label}", make, file_name=f"{stem}.{extension}", mime=mime,
                               key=f"download-{key}-{extension}", on_click="ignore", type="tertiary")


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
def figure_spec(build: Callable[..., AltairChart], *args) -> ChartSpec:
    """`build(*args)` as a drawable spec, cached by builder and arguments: building and validating an
    Altair chart is most of an interaction's time; drawing a cached spec takes a few milliseconds."""
    return chart_spec(build(*args))


def show_chart(chart: AltairChart | ChartSpec, title: str, *, data: pd.DataFrame | None = None,
               key: str | None = None, **chart_kwargs) -> DeltaGenerator | VegaLiteState:
    """A chart (an Altair chart, or a spec from `figure_spec`) with PNG and SVG downloads under it, and
    a CSV of `data` (by default an Altair chart's own data frame, if it has one: layers over several
    frames have none). `title` names the files; `key` (else the title) keys the buttons and is the
    chart's key. Returns what `st.vega_lite_chart` returns (a selection state when `on_select` is set)."""
    spec = chart if isinstance(chart, dict) else chart_spec(chart)
    shown = st.vega_lite_chart(spec=spec, key=key, **chart_kwargs)
    frame = getattr(chart, "data", None) if data is None else data
    # A chart without a height of its own (the circuit graph's is the element's) gets the element's in
    # its files; a spec's own height stays (the element's may include room for the axes).
    height = chart_kwargs.get("height")
    exported = {"height": height, **spec} if isinstance(height, int) else spec
    downloads: list[Download] = [("PNG", "png", "image/png", partial(chart_png, exported)),
                                 ("SVG", "svg", "image/svg+xml", partial(chart_svg, exported))]
    if isinstance(frame, pd.DataFrame):
        downloads.append(("CSV", "csv", "text/csv", partial(table_csv, frame)))
    stem = file_stem(title)
    _download_row(downloads, stem, key or stem)
    return shown


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


def tab_views(labels: Sequence[str], key: str, views: Sequence[Callable[[], None]]) -> None:
    """Tabs of which only the open one runs its view (Streamlit's stateful tabs: switching reruns). Each
    element a rerun sends costs the browser a redraw, so a view not open is not sent at all."""
    for tab, view in zip(st.tabs(list(labels), key=key, on_change="rerun"), views, strict=True):
        if tab.open:
            with tab:
                view()


def highlighted_tokens(tokens: Sequence[str], activations: Sequence[float], scale: float,
                       peak: int | None = None) -> str:
    """Tokens shaded by activation / scale (orange), the peak token outlined; each shaded token's
    tooltip gives the exact activation. Tokens where the feature is silent are plain text: most of
    them are, and an element each made a feature's top texts thousands of elements to redraw."""
    parts = []
    for index, (token, value) in enumerate(zip(tokens, activations, strict=True)):
        text = html.escape(token).replace("\n", "↵<br>")
        if float(value) <= 0 and index != peak:
            parts.append(text)
            continue
        strength = 0.0 if scale <= 0 else min(max(float(value) / scale, 0.0), 1.0)
        outline = "outline:2px solid #d62728;" if index == peak else ""
        parts.append(f'<span title="{float(value):.3f}" style="background:rgba(255,140,0,{strength:.2f});'
                     f'{outline}border-radius:3px;padding:0 1px">{text}</span>')
    return ('<div style="font-family:monospace;font-size:0.9em;line-height:1.9;white-space:pre-wrap">'
            + "".join(parts) + "</div>")


def top_text_html(example: Any, others: pd.DataFrame, scale: float, *, classroom: bool = False) -> str:
    """One prompt's entry among a feature's top texts: the window around the peak, the whole transcript and
    the prompt's other transcripts folded (HTML details) below it. `example` and `others`' rows have
    rank, activation, position, tokens, token_activations, prompt_tokens, kind, category, source,
    prompt_id. `classroom`: an answer to a toxic prompt without a refusal phrase is cut after its first
    words (app.classroom), the whole transcript behind a reveal."""
    def window_of(tokens: list[str], values: list[float], peak: int) -> str:
        window = peak_window(len(tokens), peak)
        return ("… " if window.start else "") + highlighted_tokens(
            tokens[window.start:window.stop], values[window.start:window.stop], scale, peak=window.peak)

    def shown(row: Any) -> str:
        tokens, values, peak = list(row.tokens), list(row.token_activations), int(row.position)
        whole = highlighted_tokens(tokens, values, scale, peak=peak)
        answer = "".join(tokens[int(row.prompt_tokens):])
        if classroom and is_harmful_compliance(row.kind, is_refusal(answer)):
            cut = int(row.prompt_tokens) + KEPT_WORDS
            return (window_of(tokens[:cut], values[:cut], min(peak, cut - 1))
                    + f"<p><i>[hidden: harmful completion, judged by {html.escape(JUDGE)}]</i></p>"
                    + f"<details><summary>reveal this transcript</summary>{whole}</details>")
        folded = (f"<details><summary>whole transcript ({len(tokens)} tokens, chat template included)</summary>"
                  f"{whole}</details>") if len(tokens) > 2 * WINDOW + 1 else ""
        return window_of(tokens, values, peak) + folded

    header = (f'<p style="margin:0.9em 0 0.2em"><b>#{example.rank + 1}</b> · peak {example.activation:.2f} · '
              f"{html.escape(f'{example.kind} · {example.category} · {example.source}')} · prompt "
              f"<code>{html.escape(str(example.prompt_id))}</code></p>")
    more = "".join(f"<p style='margin:0.5em 0 0.1em'>#{row.rank + 1} · peak {row.activation:.2f} · "
                   f"{html.escape(str(row.source))}</p>" + shown(row) for row in rows_of(others))
    return header + shown(example) + (
        f"<details><summary>{len(others)} other transcript(s) of this prompt</summary>{more}</details>" if more else "")


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return "under a minute" if minutes < 1 else f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def build_panel(progress: BuildProgress) -> None:
    """The study's background build: the stage running, its progress and the time left; or the error it
    stopped with and the command that resumes it. Nothing once a build has finished."""
    index, count = progress.position
    if progress.running:
        st.markdown(f"**Building the study**: stage {index} of {count}, `{progress.current}`" if progress.current
                    else "**Building the study**")
        step = progress.step
        if step is not None and step.fraction is not None:  # a step has a total, so always a fraction
            st.progress(step.fraction, text=f"{step.desc or 'progress'}: {step.n:g} of {step.total:g} {step.unit}")
        left = [f"Running for {duration(progress.stage_elapsed)}"]
        if step is not None and step.remaining is not None:
            left.append(f"about {duration(step.remaining)} left in this step")
        if progress.last_seconds is not None:
            left.append(f"the whole stage took {duration(progress.last_seconds)} last time")
        st.caption("; ".join(left) + ". Pages fill in as their stages land.")
    elif progress.state != FINISHED:
        where = f" in stage `{progress.current}`" if progress.current else ""
        show = st.error if progress.state == FAILED else st.warning
        resume = (f"with:\n\n```\n{progress.command}\n```" if progress.command
                  else "by running the build's command again.")
        show(f"The build {progress.state}{where}: {progress.error}\n\nResume it (finished stages are kept) {resume}")
