"""The one-click study report: Markdown (figures as embedded PNG data URIs) and a self-contained
HTML page (figures as inline SVG, no external requests), both from `narrative.sections`."""

from __future__ import annotations

import base64
import html

from markdown_it import MarkdownIt

from app.export import chart_png, chart_spec, chart_svg
from app.findings import Findings
from app.narrative import Section, sections

HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 980px; margin: 2em auto;
       padding: 0 1em; line-height: 1.5; color: #222; }
h1 { font-size: 1.9em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
code { background: #f4f4f4; padding: 0 .2em; border-radius: 3px; }
.source { color: #666; font-size: .9em; }
"""


def _title(findings: Findings) -> str:
    return f"Refusal Circuit Explorer: study {findings.study}"


def _source_line(section: Section) -> str:
    return f"*Numbers from the app's {section.page_title} page.*"


def report_markdown(findings: Findings) -> str:
    parts = [f"# {_title(findings)}", ""]
    for section in sections(findings):
        parts += [f"## {section.title}", "", section.body, ""]
        if section.chart is not None:
            png = base64.b64encode(chart_png(chart_spec(section.chart))).decode("ascii")
            parts += [f"![{section.title}](data:image/png;base64,{png})", ""]
        if section.table is not None:
            parts += [section.table.to_markdown(index=False), ""]
        parts += [_source_line(section), ""]
    return "\n".join(parts)


def report_html(findings: Findings) -> str:
    markdown = MarkdownIt("commonmark").enable("table")
    body = [f"<h1>{html.escape(_title(findings))}</h1>"]
    for section in sections(findings):
        body.append(f'<section id="{section.key}"><h2>{html.escape(section.title)}</h2>')
        body.append(markdown.render(section.body))
        if section.chart is not None:
            body.append(f"<figure>{chart_svg(chart_spec(section.chart))}</figure>")
        if section.table is not None:
            body.append(section.table.to_html(index=False, border=0))
        body.append(f'<p class="source">{markdown.renderInline(_source_line(section))}</p></section>')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(_title(findings))}'
            f"</title><style>{HTML_STYLE}</style></head><body>{''.join(body)}</body></html>")
