"""Findings: the study's answer in plain words with its evidence, each section linked to the page its
numbers come from; a one-click report; in presentation mode one section per screen."""

from __future__ import annotations

import streamlit as st

from app.components import build_panel, show_chart, show_table
from app.context import BUILD_COMMAND, FOLLOW_BUILD_KEY, current_store, presentation_mode, require_tables
from app.findings import Findings, answer, current_findings
from app.narrative import Section, sections
from app.report import report_html, report_markdown
from precompute.progress import FINISHED, BuildProgress, read_progress

SLIDE_KEY = "findings_slide"


def render_section(section: Section, *, chart_height: int | None = None) -> None:
    st.subheader(section.title)
    st.markdown(section.body)
    if section.chart is not None:
        chart = section.chart
        if chart_height:  # a slide: a taller chart with type readable from the back of a room
            chart = (chart.properties(height=chart_height).configure_axis(labelFontSize=16, titleFontSize=18)
                     .configure_title(fontSize=22).configure_legend(labelFontSize=16, titleFontSize=16))
        show_chart(chart, section.title, key=f"findings-{section.key}", width="stretch")
    if section.table is not None:
        show_table(section.table, f"{section.title} prompt counts", hide_index=True)
    st.page_link(section.page_path, label=f"Where these numbers come from: {section.page_title}",
                 icon=":material/arrow_forward:", query_params=section.query_params or None)


def render_headline(findings: Findings) -> None:
    toxic = findings.verdict("toxic")
    direction = findings.direction
    studied = findings.studied
    columns = st.columns(4)
    if toxic:
        columns[0].metric("Verdict (toxic prompts)", toxic.label, help=f"{toxic.reason} Over seeds: "
                                                                       f"{toxic.replication_text()}.")
        columns[1].metric("Between-category / ceiling", f"{toxic.ratio:.2f}",
                          help=f"95% CI {toxic.ratio_low:.2f}–{toxic.ratio_high:.2f}; monolithic at >= "
                               f"{toxic.monolithic_ratio:g}, modular below {toxic.modular_ratio:g}")
    if studied and "toxic" in studied.by_kind:
        columns[2].metric(f"Toxic prompts refused ({studied.model})", f"{studied.by_kind['toxic'].rate:.0%}",
                          help=studied.by_kind["toxic"].text())
    if direction:
        columns[3].metric("Toxic refused, direction ablated", f"{direction.toxic_ablated.rate:.0%}",
                          delta=f"{direction.toxic_ablated.rate - direction.toxic_baseline.rate:+.0%}",
                          delta_color="off", help=direction.toxic_ablated.text())


def render_report_buttons(findings: Findings) -> None:
    left, right, _ = st.columns([1, 1, 3])
    stem = f"refusal-study-{findings.study}"
    left.download_button("Report (HTML)", lambda: report_html(findings), f"{stem}.html", "text/html",
                         icon=":material/description:", on_click="ignore",
                         help="One self-contained page with every figure, for presenting or sharing.")
    right.download_button("Report (Markdown)", lambda: report_markdown(findings), f"{stem}.md", "text/markdown",
                          icon=":material/article:", on_click="ignore",
                          help="The same report as Markdown, figures embedded as PNG.")


def render_stages(findings: Findings, build: BuildProgress | None) -> None:
    running = build.current if build is not None and build.running else None
    with st.expander("What this store holds", expanded=bool(findings.missing_stages)):
        st.markdown("\n".join(f"- {'⏳' if stage == running else '✅' if stage in findings.stages_done else '⬜'} "
                              f"`{stage}`{' (building now)' if stage == running else ''}"
                              for stage in findings.stages_planned))
        if findings.missing_stages and running is None:
            st.markdown(f"Build the rest (stages already built are skipped):\n\n```\n{BUILD_COMMAND}\n```")


def render_slides(all_sections: tuple[Section, ...]) -> None:
    index = min(st.session_state.get(SLIDE_KEY, 0), len(all_sections) - 1)
    back, where, forward = st.columns([1, 4, 1])
    if back.button("← Previous", disabled=index == 0, width="stretch"):
        index -= 1
    if forward.button("Next →", disabled=index == len(all_sections) - 1, width="stretch"):
        index += 1
    st.session_state[SLIDE_KEY] = index
    where.progress((index + 1) / len(all_sections), text=f"{index + 1} / {len(all_sections)}")
    render_section(all_sections[index], chart_height=420)


store = current_store()
require_tables(store, ("prompts",))
findings = current_findings(store)
all_sections = sections(findings)
build = read_progress(store)
if findings.missing_stages and build is not None and build.running:
    st.session_state[FOLLOW_BUILD_KEY] = True  # each stage that lands adds to the findings

if presentation_mode():
    render_slides(all_sections)
else:
    st.title(f"Findings: study {findings.study}")
    st.info(answer(findings), icon=":material/lightbulb:")
    if build is not None and build.state != FINISHED:
        with st.container(border=True):
            build_panel(build)
    render_headline(findings)
    render_report_buttons(findings)
    render_stages(findings, build)
    for section in all_sections:
        render_section(section)
