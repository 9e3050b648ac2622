"""Circuits: is refusal one shared feature circuit or one per harm category? Three tabs: the verdict
with its statistics, its calibration on planted effects and the similarity heatmaps; one category's circuit (its graph and nodes,
faithfulness against size, the shared core and its tail, its attention heads); head/MLP patching."""

from __future__ import annotations

from typing import cast

import numpy as np
import pandas as pd
import streamlit as st

from app import charts, queries
from app.components import figure_spec, show_chart, show_table, tab_views
from app.context import current_store, require_tables
from app.findings import TARGET_FAITHFULNESS
from app.labels import CIRCUIT_CATEGORY_TABS, CIRCUITS_TABS
from engine.circuits.similarity import SEED_BANDS
from engine.data.schema import KINDS
from engine.data.store import rows_of

KIND_LABELS = {"toxic": "toxic", "hard": "hard (safe, toxic-looking)", "safe": "safe"}
GRAPH_NODES = 30  # shown by default: a readable graph
MEASURES = {"cosine": "cosine of node effects", "centred_cosine": "centred cosine (shared part removed)",
            "jaccard": "Jaccard of node sets"}

store = current_store()
st.title("Refusal circuits")
require_tables(store, ("circuits", "circuit_nodes", "circuit_edges", "circuit_faithfulness", "circuit_similarity",
                       "circuit_verdicts", "circuit_core", "circuit_components", "circuit_calibration"))

summary = queries.query(store, queries.CIRCUITS_SQL)
verdicts = queries.query(store, queries.CIRCUIT_VERDICTS_SQL).set_index("kind")
calibration = queries.query(store, queries.CIRCUIT_CALIBRATION_SQL)
core_share = float(queries.query(store, queries.CORE_SHARE_SQL)["core_share"].iloc[0])
ok = summary[summary["status"] == "ok"]
metric_name, method = summary["metric_name"].iloc[0], summary["method"].iloc[0]
st.caption(f"Nodes are SAE features and SAE error terms at the prompt-end positions; effects on the **{metric_name}** "
           f"of the first response token by **{method.replace('_', ' ')}**, against the mean safe prompt (toxic and "
           "hard prompts) or the mean toxic prompt (safe prompts).")

skipped = summary[summary["status"] != "ok"]
if len(skipped):
    st.warning("Some groups have too few prompts for the statistics and are left out:\n\n"
               + "\n".join(f"- **{row.kind}/{row.category}**: {row.message}" for row in skipped.itertuples()))


def seed_bands_text() -> str:
    """The seed notebooks' bands in words: "> 0.8 monolithic, 0.5–0.8 partially modular, < 0.5 modular"."""
    (high, top), (low, middle), (_, bottom) = SEED_BANDS
    return f"> {high:g} {top}, {low:g}–{high:g} {middle}, < {low:g} {bottom}"


def verdict_of(kind: str) -> pd.Series:
    """The kind's `circuit_verdicts` row: there is one per kind (pandas-stubs allows for several, a frame)."""
    return cast(pd.Series, verdicts.loc[kind])


def show_verdict(kind: str) -> None:
    row = verdict_of(kind)
    st.markdown(f"### {KIND_LABELS[kind].capitalize()} prompts: **{row['label']}**")
    st.markdown(f"Because {row['reason']}.")
    cols = st.columns(5)
    cols[0].metric("Ratio to ceiling", f"{row['ratio']:.0%}",
                   help=f"95% CI {row['ratio_low']:.0%}–{row['ratio_high']:.0%} (joint bootstrap over prompts: each "
                        f"draw recomputes both parts). Between-category cosine {row['between']:.2f} (mean over "
                        f"{row['n_categories']} categories' pairs, SAE features only) over the within-category "
                        f"ceiling {row['ceiling']:.2f} (how alike two samples of one category's prompts are). "
                        f"Monolithic when the whole interval is ≥ {row['monolithic_ratio']:.0%}; modular when it is "
                        f"< {row['modular_ratio']:.0%} and the permutation test rejects; partially modular in "
                        "between; otherwise inconclusive")
    cols[1].metric("Category share q", f"{row['category_share']:.2f}",
                   help=f"95% CI {row['category_share_low']:.2f}–{row['category_share_high']:.2f}: the share of the "
                        "mean effect's energy that is category-specific (centred category means, noise removed); "
                        f"the category tails are {row['centred_within']:.0%} reproducible over prompts")
    cols[2].metric("Permutation p", f"{row['p_value']:.3g}",
                   help=f"{row['permutations']} shuffles of the category labels, statistic the between-category sum "
                        "of squares: how often random categories differ as much as the real ones")
    cols[3].metric("Category decoding", f"{row['decoding_accuracy']:.0%}",
                   help=f"nearest-category-mean classifier, {int(row['decoding_folds'])}-fold cross-validated, on "
                        f"per-prompt node effects; chance {row['decoding_chance']:.0%}, 95% of label shuffles reach "
                        f"{row['decoding_null_high']:.0%}, p = {row['decoding_p']:.3g}")
    cols[4].metric(f"Jaccard (top {row['circuit_size']})", f"{row['mean_jaccard']:.2f}",
                   help=f"mean node-set overlap between categories (SAE features); two halves of one category: "
                        f"{row['jaccard_split_half']:.2f}; shared core: {row['core_size']} nodes in ≥ "
                        f"{core_share:.0%} of circuits")
    st.caption(f"SAE error terms carry {row['error_share']:.0%} of the circuits' summed |effect| and are left out of "
               f"these comparisons. The seed notebooks' fixed thresholds on the raw mean cosine ({seed_bands_text()}) "
               f"would say **{row['seeds_label']}** ({row['between']:.2f}): they ignore noise.")


def show_calibration(kind: str) -> None:
    """The rule on simulated studies at this study's sizes and noise, with a planted category share."""
    row = verdict_of(kind)
    table = calibration[(calibration["kind"] == kind) & (calibration["purpose"] == "grid")]
    detectable = row["detectable_share"]
    said = (f"detects a category-specific share of **q = {detectable:.2f}** or more in at least 80% of them"
            if pd.notna(detectable) else f"does not reliably detect even **q = {row['largest_share']:g}**")
    st.markdown(f"**Calibration ({kind})**: {int(row['calibration_simulations'])} simulated studies per planted share "
                f"q, each with {int(row['prompts_per_category'])} prompts per category and noise resampled from this "
                f"study's own residuals. The rule {said}, and says \"modular\" in {row['false_modular']:.0%} of "
                "studies without category structure (q = 0).")
    show_chart(figure_spec(charts.calibration_curve, table, float(detectable)),
               f"Verdict against planted share, {kind}", data=table, width="stretch")
    more = calibration[(calibration["kind"] == kind) & (calibration["purpose"] == "sample size")]
    if len(more):
        st.caption("More prompts, at the study's estimated share: " + "; ".join(
            f"{int(r.prompts_per_category)} per category decide it in {1 - r.inconclusive:.0%} of simulations"
            for r in rows_of(more)) + ".")


# --- Similarity heatmaps (a fragment: switching the measure reruns only this part) -------------------
@st.cache_data(show_spinner=False, max_entries=8)
def similarity_matrix(path: str, version: int, measure: str) -> pd.DataFrame:
    """Every ordered pair of circuits with `measure` as `value` and its CI as text, split-half
    reliability on the diagonal. Cached per store version: building it was a third of a redraw."""
    circuits = queries.query(path, queries.CIRCUITS_SQL)
    circuits = circuits[circuits["status"] == "ok"]
    similarity = queries.query(path, queries.CIRCUIT_SIMILARITY_SQL)
    mirrored = similarity.rename(columns={"kind_a": "kind_b", "category_a": "category_b", "kind_b": "kind_a",
                                          "category_b": "category_a", "n_a": "n_b", "n_b": "n_a"})
    diagonal = circuits.assign(
        kind_a=circuits["kind"], category_a=circuits["category"], kind_b=circuits["kind"],
        category_b=circuits["category"], cosine=circuits["split_half_cosine"], jaccard=circuits["split_half_jaccard"],
        centred_cosine=circuits["split_half_centred"], n_a=circuits["n_prompts"], n_b=circuits["n_prompts"])
    full = pd.concat([similarity, mirrored, diagonal], ignore_index=True)
    full = full[full[measure].notna()] if measure == "centred_cosine" else full  # centred: within a kind only
    full["measure"], full["value"] = measure, full[measure]
    missing = pd.Series(np.nan, index=full.index)  # the centred cosine has no range
    on_diagonal = (full["kind_a"] == full["kind_b"]) & (full["category_a"] == full["category_b"])
    note = "reliability of the category's tail (diagonal)" if measure == "centred_cosine" else "split-half (diagonal)"
    full["ci"] = [f"{low:.2f}–{high:.2f}" if pd.notna(low) else (note if diagonal else "—")
                  for low, high, diagonal in zip(full.get(f"{measure}_low", missing), full.get(f"{measure}_high", missing),
                                                 on_diagonal, strict=True)]
    full["row"] = full["kind_a"] + "/" + full["category_a"]
    full["column"] = full["kind_b"] + "/" + full["category_b"]
    return full


@st.fragment
def similarity_heatmaps() -> None:
    st.subheader("How alike the circuits are")
    measure = st.radio("Similarity", list(MEASURES), horizontal=True, format_func=MEASURES.get)
    full = similarity_matrix(str(store), queries.store_version(store), measure)

    def heatmap(data: pd.DataFrame, title: str, rows: str, columns: str, y_title: str, x_title: str) -> None:
        if data.empty:
            return
        st.markdown(f"**{title}**")
        # Keyed by title alone: the chart stays the same element across measures and takes the new data.
        show_chart(figure_spec(charts.similarity_heatmap, data, rows, columns, y_title, x_title),
                   f"{title}, {measure}", data=data, key=f"similarity {title}", width="stretch",
                   height=max(160, 26 * data[rows].nunique() + 70))

    def between(rows_kind: str, columns_kind: str) -> pd.DataFrame:
        return full[(full["kind_a"] == rows_kind) & (full["kind_b"] == columns_kind)]

    st.caption("SAE features only. Diagonal: split-half similarity (one category, two halves of its prompts); for the "
               "centred cosine, how reproducible the category's own deviation from the kind's mean is. The centred "
               "cosine compares what is left after removing the categories' shared mean: without category tails "
               "every off-diagonal cell is near -1/(K-1). Hover a cell for its bootstrap range (noise shrinks a "
               "resampled similarity, so this is a range, not an interval for the value) and, within one kind, the "
               "permutation p-value of the two categories differing, alone and Holm-corrected over all pairs.")
    side_a, side_b = st.columns(2)
    with side_a:
        heatmap(between("toxic", "toxic"), "Toxic circuits", "category_a", "category_b", "toxic", "toxic")
    with side_b:
        heatmap(between("hard", "hard"), "Safe-side (hard) circuits", "category_a", "category_b", "hard", "hard")
    heatmap(pd.concat([between("hard", "toxic"), between("safe", "toxic")]), "Safe-side (rows) against toxic (columns)",
            "row", "category_b", "safe side", "toxic")
    # Every pair in one matrix, on request: the blocks above are its readable parts, and drawing all of
    # it took most of a measure switch.
    if st.toggle("Show every circuit against every other in one matrix", key="similarity_all"):
        heatmap(full, "All circuits", "row", "column", "circuit", "circuit")


# --- Heads and MLPs -------------------------------------------------------------------------------
patching = queries.query(store, queries.CIRCUIT_COMPONENTS_SQL)
estimated = patching[patching["method"] == "attribution"]
exact = patching[patching["method"] == "exact"][["category", "component", "layer", "head", "effect"]].rename(
    columns={"effect": "exact"})
patching = estimated.merge(exact, on=["category", "component", "layer", "head"], how="left")


def patching_maps() -> None:
    st.subheader("Attention heads and MLP outputs: patching, toxic → safe")
    st.caption(f"Each site's output at the prompt-end positions of {int(patching['n_receivers'].iloc[0])} safe prompts "
               "is set to its mean over a category's toxic prompts: the share of the toxic-safe gap in the "
               f"{metric_name} that this moves, estimated by attribution patching for every site; outlined cells were "
               "re-checked by exact patching (hover for both).")
    for component, title in (("attn", "Attention output"), ("mlp", "MLP output")):
        st.markdown(f"**{title}** by layer")
        sites = patching[patching["component"] == component]
        show_chart(figure_spec(charts.patching_map, sites, "category:N"), f"{title} patching by layer", data=sites,
                   width="stretch", height=300)


@st.fragment  # the thresholds redraw only the graph and its node table
def circuit_graph(kind: str, category: str, row: pd.Series, nodes: pd.DataFrame, edges: pd.DataFrame,
                  hooks: list[str]) -> None:
    largest = float(nodes["effect"].abs().max())
    a, b, c = st.columns(3)
    circuit_size = int(nodes["in_circuit"].sum())
    max_nodes = a.slider("Nodes at most", 1, len(nodes), min(GRAPH_NODES, circuit_size),
                         help=f"the study's circuit has {circuit_size} nodes; {len(nodes)} are stored; edges are "
                              "computed among the circuit's top nodes")
    node_threshold = b.slider("Node |effect| at least", 0.0, largest, 0.0, format="%.3f")
    widest = float(edges["effect"].abs().max()) if len(edges) else 0.0
    edge_threshold = c.slider("Edge |effect| at least", 0.0, max(widest, 1e-6), widest / 10, format="%.4f",
                              help="edges are computed between the study's circuit nodes")
    shown_nodes = nodes[(nodes["rank"] < max_nodes) & (nodes["effect"].abs() >= node_threshold)]
    shown_edges = edges[edges["effect"].abs() >= edge_threshold]
    features = shown_nodes[shown_nodes["feature"] >= 0]
    wanted = (tuple(hooks), tuple(features["feature"].tolist()))
    labels = queries.query(store, queries.FEATURE_LABELS_SQL, wanted + wanted)
    shown_nodes = shown_nodes.merge(charts.feature_labels(labels), on=["hook", "feature"], how="left")
    shown_nodes["label"] = shown_nodes["label"].fillna("")

    m1, m2, m3, m4 = st.columns(4)
    m1.metric("Prompts", int(row.n_prompts))
    m2.metric(f"Faithfulness ({int(row.n_nodes)} nodes)", f"{row.faithfulness:.0%}",
              help=f"mean {metric_name}: {row.metric_full:+.2f} unpatched, {row.metric_empty:+.2f} with every node "
                   "mean-ablated; faithfulness = (circuit - empty) / (full - empty)")
    m3.metric("Split-half cosine", f"{row.split_half_cosine:.2f}", help="the circuit's own reliability over prompts")
    m4.metric("Nodes / edges shown", f"{len(shown_nodes)} / {len(shown_edges)}")
    st.caption(f"Columns left to right: {' → '.join(f'`{h}`' for h in hooks)}. Red pushes towards refusal, blue away; "
               "size and line width follow |effect|; squares are SAE error terms. Click a feature to open its "
               "dashboard.")
    if shown_nodes.empty:
        st.info("No node passes these thresholds: lower them.")
    else:
        show_chart(figure_spec(charts.circuit_graph, shown_nodes, shown_edges, hooks),
                   f"Circuit graph, {kind} {category}", data=shown_nodes, key="circuit-graph", width="stretch",
                   height=charts.circuit_graph_height(shown_nodes))

    # The ignore: pandas-stubs types a list column as scalars only, but None (an empty link) is valid.
    table = shown_nodes.assign(dashboard=[  # pyright: ignore[reportArgumentType]
        f"features?hook={r.hook}&feature={int(r.feature)}" if r.feature >= 0 else None
        for r in rows_of(shown_nodes)])
    ranked_on, held_out = int(nodes["n_prompts"].max()), int(nodes["n_held_out"].max())
    show_table(table[["rank", "hook", "feature", "effect", "effect_se", "effect_held_out", "share_positive", "label",
                      "dashboard"]],
               f"Circuit nodes, {kind} {category}", hide_index=True, width="stretch", height=260, column_config={
                   "feature": st.column_config.NumberColumn("feature", help="-1: the SAE's error term"),
                   "effect": st.column_config.NumberColumn(
                       "effect", format="%+.4f", help=f"mean over the {ranked_on} prompts the nodes were ranked on"),
                   "effect_se": st.column_config.NumberColumn("± s.e.", format="%.4f"),
                   "effect_held_out": st.column_config.NumberColumn(
                       "held-out effect", format="%+.4f",
                       help=f"mean over the group's other {held_out} prompts, which the faithfulness is measured on: "
                            "a node whose effect does not hold there was ranked on noise"),
                   "share_positive": st.column_config.NumberColumn("prompts > 0", format="percent"),
                   "label": st.column_config.TextColumn("about", help="tokens it promotes most; the token its top examples peak on"),
                   "dashboard": st.column_config.LinkColumn("dashboard", display_text="open")})


# --- One category in depth (a fragment: picking a kind, category or threshold reruns only this part) ---
@st.fragment
def category_circuit() -> None:
    st.subheader("A category's circuit")
    left, right = st.columns(2)
    kinds = [k for k in KINDS if k in set(ok["kind"])]
    kind = left.radio("Prompts", kinds, format_func=KIND_LABELS.get, horizontal=True)
    categories: list[str] = ok.loc[ok["kind"] == kind, "category"].tolist()
    category = right.selectbox("Category", categories)
    row = ok[(ok["kind"] == kind) & (ok["category"] == category)].iloc[0]
    nodes = queries.query(store, queries.CIRCUIT_NODES_SQL, (kind, category))
    edges = queries.query(store, queries.CIRCUIT_EDGES_SQL, (kind, category))
    hooks = nodes.sort_values("layer")["hook"].unique().tolist()

    # A new category redraws the open view only, not all four (all four made a category switch take 0.4 s).
    tab_views(CIRCUIT_CATEGORY_TABS, "circuit_view", [
        lambda: circuit_graph(kind, category, row, nodes, edges, hooks),
        lambda: faithfulness_view(kind, category, row, categories),
        lambda: core_view(kind, category, categories),
        lambda: heads_view(category)])


def faithfulness_view(kind: str, category: str, row: pd.Series, categories: list[str]) -> None:
    faithfulness = queries.query(store, queries.CIRCUIT_FAITHFULNESS_SQL)
    curve = faithfulness[faithfulness["kind"] == kind]
    n_kept = int((ok.loc[ok["kind"] == kind, "faithfulness"] >= TARGET_FAITHFULNESS).sum())
    st.markdown(f"Mean-ablating every node outside the top *n*; **{n_kept} of {len(categories)}** {kind} circuits keep "
                f"≥ {TARGET_FAITHFULNESS:.0%} of the {metric_name} at the stated size ({int(row.n_nodes)} nodes).")
    show_chart(figure_spec(charts.faithfulness_curves, curve, category, TARGET_FAITHFULNESS),
               f"Faithfulness against circuit size, {kind}", data=curve, width="stretch")


def core_view(kind: str, category: str, categories: list[str]) -> None:
    core = queries.query(store, queries.CIRCUIT_CORE_SQL, (kind,))
    if core.empty:
        st.info(f"No {kind} verdict: a core needs two or more {kind} circuits.")
        return
    in_core = core[core["in_core"]]
    st.markdown(f"**{len(in_core)}** nodes are in at least {core_share:.0%} of the {len(categories)} {kind} circuits "
                "(the shared core); the rest of each circuit is its tail.")
    core_left, core_right = st.columns(2)
    with core_left:
        show_table(in_core[["hook", "feature", "n_circuits", "share", "mean_effect"]], f"Shared core, {kind}",
                   hide_index=True, width="stretch", column_config={
                       "share": st.column_config.NumberColumn("share of circuits", format="percent"),
                       "mean_effect": st.column_config.NumberColumn("mean effect", format="%+.4f")})
    in_category = core["categories"].map(lambda cats: category in list(cats), na_action="ignore")
    tail = core[~core["in_core"] & in_category]
    with core_right:
        st.markdown(f"Tail of **{category}**: its circuit nodes outside the core")
        show_table(tail[["hook", "feature", "n_circuits", "mean_effect"]], f"Tail of {kind} {category}",
                   hide_index=True, width="stretch",
                   column_config={"n_circuits": st.column_config.NumberColumn("in # circuits"),
                                  "mean_effect": st.column_config.NumberColumn("mean effect", format="%+.4f")})


def heads_view(category: str) -> None:
    heads = patching[(patching["component"] == "head") & (patching["category"] == category)]
    if heads.empty:
        st.info(f"No attention heads were patched for {category}.")
        return
    st.markdown(f"Attention heads by layer for **{category}**: the share of the toxic-safe gap each head's output "
                "moves (attribution patching; outlined cells re-checked exactly).")
    show_chart(figure_spec(charts.patching_map, heads, "head:O"), f"Head patching, {category}", data=heads,
               width="stretch", height=260)


def verdicts_and_similarity() -> None:
    for kind in [k for k in ("toxic", "hard") if k in verdicts.index]:
        show_verdict(kind)
        show_calibration(kind)
    similarity_heatmaps()


# A first visit builds the open part's charts only, not all of the page's (the whole page took 2.6-2.9 s to
# first appear here).
tab_views(CIRCUITS_TABS, "circuits_section", [verdicts_and_similarity, category_circuit, patching_maps])
