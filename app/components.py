"""Small rendering helpers shared by pages (HTML that Streamlit has no widget for)."""

from __future__ import annotations

import html
from collections.abc import Sequence


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
