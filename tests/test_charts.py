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
    return pairs.assign(measure="cosine", value=0.5, ci="0.4–0.6", p_value=0.01, n_a=10, n_b=10)


def test_similarity_heatmap_writes_values_only_where_they_can_be_read() -> None:
    small = chart_spec(charts.similarity_heatmap(_similarity(10), "row", "column", "a", "b"))
    large = chart_spec(charts.similarity_heatmap(_similarity(30), "row", "column", "a", "b"))
    assert [layer["mark"]["type"] for layer in small["layer"]] == ["rect", "text"]
    assert "layer" not in large and large["mark"]["type"] == "rect"


def test_similarity_heatmap_spec_is_the_same_for_both_measures() -> None:
    """Switching the measure swaps the data only: the browser keeps the drawn chart."""
    cosine = _similarity(10).assign(value=-0.4)
    jaccard = _similarity(10).assign(measure="jaccard", value=0.7)
    specs = [chart_spec(charts.similarity_heatmap(data, "row", "column", "a", "b")) for data in (cosine, jaccard)]
    assert specs[0]["datasets"] != specs[1]["datasets"]
    assert {**specs[0], "datasets": None} == {**specs[1], "datasets": None}
    assert specs[0]["layer"][0]["encoding"]["color"]["scale"]["domain"] == [-1, 1]


def test_histogram_bins_span_zero_to_the_maximum_activation() -> None:
    bins = charts.histogram_bins([5, 0, 2, 1], 2.0)
    assert bins["from"].tolist() == [0.0, 0.5, 1.0, 1.5] and bins["to"].tolist() == [0.5, 1.0, 1.5, 2.0]
    assert bins["tokens"].tolist() == [5, 0, 2, 1]
    assert np.isclose(charts.histogram_bins([1, 1], 0.0)["to"].iloc[-1], 1.0)  # a dead feature still has bins


def test_circuit_layout_places_nodes_by_layer_and_joins_the_shown_edges() -> None:
    from app.charts import circuit_graph, circuit_layout

    hooks = ["blocks.1.hook_resid_pre", "blocks.3.hook_resid_pre"]
    nodes = pd.DataFrame({"hook": [hooks[0], hooks[0], hooks[0], hooks[1]], "feature": [5, -1, 7, 2],
                          "effect": [0.1, 0.4, -0.2, 0.3], "effect_se": 0.01, "label": ["a", "", "b", "c"]})
    edges = pd.DataFrame({"upstream_hook": [hooks[0], hooks[0]], "upstream_feature": [5, 9],
                          "downstream_hook": [hooks[1], hooks[1]], "downstream_feature": [2, 2], "effect": [-0.05, 0.2]})
    placed, joined = circuit_layout(nodes, edges, hooks)
    first = placed[placed["column"] == 0].set_index("name")
    assert list(first.index) == ["error", "5", "7"]  # largest effect on top
    assert list(first["row"]) == [-1.0, 0.0, 1.0]  # centred
    assert placed.loc[placed["column"] == 1, "row"].tolist() == [0.0]
    assert first.loc["error", "kind"] == "SAE error term" and pd.isna(first.loc["error", "dashboard"])
    assert first.loc["7", "sign"] == "away from refusal"
    assert first.loc["5", "dashboard"] == "features?hook=blocks.1.hook_resid_pre&feature=5"
    assert first["caption"].to_dict() == {"error": "error", "5": "5: a", "7": "7: b"}  # id and what it is about
    assert len(joined) == 1  # feature 9 is not shown: its edge is left out
    assert joined.iloc[0][["column", "row", "column_end", "row_end", "sign"]].tolist() == [0, 0.0, 1, 0.0,
                                                                                           "away from refusal"]
    spec = circuit_graph(nodes, edges, hooks).to_dict()
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["rule", "point", "text"]
    assert spec["layer"][2]["encoding"]["text"]["field"] == "caption"
    assert spec["layer"][1]["encoding"]["href"]["field"] == "dashboard"
    # the height is the page element's (a row per node of the tallest layer), not the spec's
    assert "height" not in spec
    assert charts.circuit_graph_height(nodes) == charts.GRAPH_MIN_PX
    tall = pd.DataFrame({"hook": [hooks[0]] * 10 + [hooks[1]] * 2})
    assert charts.circuit_graph_height(tall) == 10 * charts.GRAPH_ROW_PX


def test_highlighted_tokens_shade_only_where_the_feature_fires() -> None:
    from app.components import highlighted_tokens

    shown = highlighted_tokens(["How", " to", " <pick>", " a", "\n"], [0.0, 0.5, 2.0, 0.0, -0.1], 2.0, peak=3)
    # silent tokens are plain (escaped) text; firing ones and the peak are shaded spans with their value
    assert shown.count("<span") == 3
    assert 'title="0.500" style="background:rgba(255,140,0,0.25);' in shown
    assert 'title="2.000" style="background:rgba(255,140,0,1.00);' in shown
    assert 'title="0.000" style="background:rgba(255,140,0,0.00);outline:2px solid' in shown  # the peak
    assert "How" in shown and "&lt;pick&gt;" in shown and "↵<br>" in shown and "<pick>" not in shown


def test_firing_rates_keep_the_frames_order_with_one_spec_for_any_features() -> None:
    import re

    from app.export import chart_spec, chart_svg

    def aligned(features: list[int]) -> pd.DataFrame:
        n = len(features)
        return pd.DataFrame({"feature": features, "toxic_rate": np.linspace(0.9, 0.5, n), "safe_rate": 0.1,
                             "refusal_cosine": 0.3, "n_toxic_fired": 5, "n_toxic": 10, "n_safe_fired": 1, "n_safe": 10})

    first, second = chart_spec(charts.firing_rates(aligned([7, 3, 9]))), chart_spec(charts.firing_rates(aligned([2, 8, 5])))
    assert {k: v for k, v in first.items() if k != "datasets"} == {k: v for k, v in second.items() if k != "datasets"}
    labels = re.findall(r">(\d)</text>", chart_svg(first))
    assert [label for label in labels if label in "739"][:3] == ["7", "3", "9"]


def test_category_heatmaps_label_every_category_and_fit_the_colours_to_the_data() -> None:
    names = [f"category number {i}" for i in range(10)]
    cosines = pd.DataFrame([(a, b, 1.0 if a == b else 0.8 + 0.016 * ((i + j) % 10), 0.7, 0.99)
                            for i, a in enumerate(names) for j, b in enumerate(names)],
                           columns=["category_a", "category_b", "cosine", "ci_low", "ci_high"])
    spec = chart_spec(charts.category_cosines(cosines))
    encoding = spec["encoding"]
    assert encoding["x"]["axis"]["labelOverlap"] is False and encoding["y"]["axis"]["labelOverlap"] is False
    off = cosines.loc[cosines["category_a"] != cosines["category_b"], "cosine"]
    assert encoding["color"]["scale"]["domain"] == [off.min(), off.max()]  # not [0, 1]
    assert f"{off.min():.2f}-{off.max():.2f}" in spec["title"]
    cross = pd.DataFrame({"ablated": names, "category": names, "n": 5, "refusal_rate_by_score": 0.5,
                          "mean_refusal_score": 0.0})
    cross_spec = chart_spec(charts.cross_ablation(cross, names))["encoding"]
    assert cross_spec["x"]["axis"]["labelOverlap"] is False and cross_spec["y"]["axis"]["labelOverlap"] is False
    assert charts.fitted_domain(pd.Series([0.5, 0.5])) == [0.49, 0.51]


def test_feature_labels_name_promoted_tokens_and_the_peak_token_on_one_line() -> None:
    labels = pd.DataFrame({"hook": ["h", "h"], "feature": [1, 2], "top_tokens": [" sorry  cannot", "\n\n x"],
                           "peak_token": ["'m", None]})
    assert charts.feature_labels(labels)["label"].tolist() == ["promotes  sorry  cannot · fires on 'm",
                                                               "promotes ⏎⏎ x"]
