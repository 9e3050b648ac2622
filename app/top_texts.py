"""A feature's top activating texts as a reader learns from them (Neuronpedia-style): a window around the
peak token with the rest of the transcript folded away, one entry per prompt (the corpus holds several
transcripts of a prompt: each model's answer, the ablated one), and an optional ordering that spreads the
entries over categories and kinds instead of showing one topic eight times."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pandas as pd

WINDOW = 12  # tokens shown either side of the peak


@dataclass(frozen=True)
class Window:
    start: int  # first token shown
    stop: int  # one past the last token shown
    peak: int  # the peak's index inside the window


def peak_window(n_tokens: int, peak: int, width: int = WINDOW) -> Window:
    """The tokens within `width` of the peak (fewer at the transcript's ends)."""
    start, stop = max(0, peak - width), min(n_tokens, peak + width + 1)
    return Window(start, stop, peak - start)


def one_per_prompt(examples: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each prompt's strongest transcript (in rank order), and the other transcripts of those prompts."""
    ranked = examples.sort_values("rank", kind="stable")
    first = ~ranked["prompt_id"].duplicated()
    return ranked[first].reset_index(drop=True), ranked[~first].reset_index(drop=True)


def diverse_order(examples: pd.DataFrame) -> pd.DataFrame:
    """Round robin over (kind, category) groups, each group's entries strongest first; groups take turns in
    the order of their strongest entry, so the first entries cover as many groups as there are."""
    ranked = examples.sort_values("rank", kind="stable")
    groups = [group for _, group in ranked.groupby(["kind", "category"], sort=False)]
    turns = itertools.zip_longest(*[[row for _, row in group.iterrows()] for group in groups])
    rows = [row for turn in turns for row in turn if row is not None]
    return pd.DataFrame(rows).reset_index(drop=True) if rows else ranked
