"""The pages' chart builders: pure functions of data frames."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from app import charts
from app.export import chart_spec


def _similarity(n: int) -> pd.DataFrame:
    names = [f"c{i}" for i in range(n)]
    pairs = pd.DataFrame(list(itertools.product(names, names)), columns=["row", "column"])
    return pairs.assign(value=0.5, ci="0.4–0.6", p_value=0.01, n_a=10, n_b=10)


def test_similarity_heatmap_writes_values_only_where_they_can_be_read() -> None:
    small = chart_spec(charts.similarity_heatmap(_similarity(10), "cosine", "row", "column", "a", "b"))
    large = chart_spec(charts.similarity_heatmap(_similarity(30), "jaccard", "row", "column", "a", "b"))
    assert [layer["mark"]["type"] for layer in small["layer"]] == ["rect", "text"]
    assert "layer" not in large and large["mark"]["type"] == "rect"
    assert large["encoding"]["color"]["scale"]["scheme"] == "greens"


def test_histogram_bins_span_zero_to_the_maximum_activation() -> None:
    bins = charts.histogram_bins([5, 0, 2, 1], 2.0)
    assert bins["from"].tolist() == [0.0, 0.5, 1.0, 1.5] and bins["to"].tolist() == [0.5, 1.0, 1.5, 2.0]
    assert bins["tokens"].tolist() == [5, 0, 2, 1]
    assert np.isclose(charts.histogram_bins([1, 1], 0.0)["to"].iloc[-1], 1.0)  # a dead feature still has bins
