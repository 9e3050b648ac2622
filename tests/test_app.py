"""App pages rendered through Streamlit's AppTest on a store built from a tiny model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from engine.data import store

APP = Path(__file__).resolve().parents[1] / "app"


def _page(name: str, store_path: Path, **state: object) -> AppTest:
    app = AppTest.from_file(str(APP / "views" / f"{name}.py"), default_timeout=60)
    app.session_state["store_path"] = str(store_path)
    for key, value in state.items():
        app.session_state[key] = value
    return app.run()


def test_overview_shows_rates_for_both_models(tiny_store: Path) -> None:
    app = _page("overview", tiny_store)
    assert not app.exception and not app.error
    rates = store.read_table(tiny_store, "refusal_rates")
    toxic = rates[rates["kind"] == "toxic"].groupby("model")[["n", "n_refused"]].sum()
    metrics = {m.label: m for m in app.metric}
    assert set(metrics) >= {"base refused (toxic)", "other refused (safe)"}
    assert metrics["base refused (toxic)"].help == f"{toxic.loc['base', 'n_refused']} of {toxic.loc['base', 'n']} prompts"
    charts = app.get("vega_lite_chart")
    # toxic and hard by category, then the held-out sets (here the built-in set again and the hard test prompts)
    assert len(charts) == 3 and all('"refusal rate"' in chart.proto.spec for chart in charts)
    assert '"field": "set"' in charts[2].proto.spec  # the held-out sets side by side
    agreement = app.dataframe[1].value
    assert set(agreement["model"]) == {"base", "other"}


def test_overview_without_store_explains_how_to_build_one(tmp_path: Path) -> None:
    app = _page("overview", tmp_path / "nothing.duckdb")
    assert not app.exception
    assert "python -m precompute run" in app.info[0].value


def test_overview_on_a_broken_store_shows_one_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.duckdb"
    broken.write_text("garbage")
    app = _page("overview", broken)
    assert not app.exception and len(app.error) == 1
    assert "not a readable DuckDB store" in app.error[0].value


def test_store_missing_stages_says_which(tmp_path: Path, tiny_store: Path) -> None:
    partial = tmp_path / "partial.duckdb"
    prompts = store.read_table(tiny_store, "prompts").drop(columns="run_id")
    run = store.RunRecord(study="p", stage="prompts", models=(), dataset="builtin", config={})
    store.write_stage(partial, run=run, input_hash="x", tables={"prompts": prompts})
    app = _page("overview", partial)
    assert not app.exception
    assert "stage generate has not run" in app.warning[0].value


def test_prompt_browser_filters_with_parameters(tiny_store: Path) -> None:
    app = _page("prompts", tiny_store)
    assert not app.exception and not app.error
    shown = app.dataframe[0].value
    assert len(shown) > 0 and set(shown["split"]) == {"test"}
    app.text_input[0].set_value("'; DROP TABLE prompts; --")
    app.button[0].click().run()
    assert not app.exception and len(app.dataframe[0].value) == 0  # a literal search, no injection
    assert len(store.read_table(tiny_store, "prompts")) > 0


def test_directions_page_marks_the_chosen_candidate(tiny_store: Path) -> None:
    app = _page("directions", tiny_store)
    assert not app.exception and not app.error
    candidates = store.read_table(tiny_store, "direction_candidates")
    chosen = candidates[candidates["chosen"]].iloc[0]
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Chosen layer / position"] == f"{chosen['layer']} / {chosen['position_label']}"
    assert len(app.get("vega_lite_chart")) >= 7
    # the trade-off section: its chart and a caption naming the best point within the KL limit, from the store
    tradeoff = store.read_table(tiny_store, "ablation_tradeoff")
    captions = " ".join(c.value for c in app.caption)
    assert "Wollschläger" in captions and "Pareto front" in captions
    assert f"KL {10.0:g}" in captions  # the tiny study's directions.max_kl
    best = tradeoff[tradeoff["mean_kl"] <= 10.0].nsmallest(1, "rate").iloc[0]
    assert f"still refused is {best['rate']:.0%}" in captions
    app.radio[0].set_value("kl").run()
    assert not app.exception


def test_features_page_renders_a_feature_dashboard(tiny_store: Path) -> None:
    app = AppTest.from_file(str(APP / "views" / "features.py"), default_timeout=60)
    app.session_state["store_path"] = str(tiny_store)
    app.query_params["hook"] = "blocks.1.hook_resid_pre"
    app.query_params["feature"] = "5"
    app.run()
    assert not app.exception and not app.error
    assert app.selectbox[0].value == "blocks.1.hook_resid_pre"
    assert app.header[0].value == "Feature 5"
    assert [tab.label for tab in app.tabs] == ["Feature dashboard", "All features",
                                               "SAE quality and refusal-aligned features"]
    assert not app.dataframe or len(app.dataframe[0].value) < 128  # only the open tab is drawn
    features = store.read_table(tiny_store, "features").query("hook == 'blocks.1.hook_resid_pre'")
    feature = features.set_index("feature").loc[5]
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Max activation"] == f"{feature['max_activation']:.2f}"
    examples = store.read_table(tiny_store, "feature_examples").query(
        "hook == 'blocks.1.hook_resid_pre' and feature == 5")
    shown = next(h.proto.body for h in app.get("html") if "<b>#1</b>" in h.proto.body)  # all examples, one element
    prompts = store.read_table(tiny_store, "sae_corpus").set_index("text_id").loc[examples["text_id"], "prompt_id"]
    assert shown.count("</b> · peak ") == prompts.nunique()  # one entry per prompt, the rest folded under it
    assert shown.count("· peak ") == len(examples) and f"peak {examples['activation'].max():.2f}" in shown

    app.session_state["features_view"] = "SAE quality and refusal-aligned features"
    app.run()
    saes = store.read_table(tiny_store, "saes").set_index("hook")
    assert {m.label: m.value for m in app.metric}["L0"] == f"{saes.loc['blocks.1.hook_resid_pre', 'l0']:.1f}"
    assert not app.header  # no dashboard in this tab

    # the table of all features; search filters it
    app.session_state["features_view"] = "All features"
    app.run()
    assert not app.exception and app.dataframe[0].value.shape[0] == len(features) == 128
    app.text_input(key="feature_search").input("5").run()
    assert app.dataframe[0].value["feature"].tolist() == [5]

    # every change of the feature or the SAE sticks (the URL follows, not leads), also across the tabs
    app.session_state["features_view"] = "Feature dashboard"
    app.run()
    for feature in (4, 5, 6, 7):
        app.number_input[0].set_value(feature).run()
        assert app.header[0].value == f"Feature {feature}" and app.query_params["feature"] == str(feature)
    for view in ("All features", "Feature dashboard"):
        app.session_state["features_view"] = view
        app.run()
    assert app.header[0].value == "Feature 7"  # kept while the dashboard was not drawn
    for hook in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre"):
        app.selectbox[0].set_value(hook).run()
        assert app.selectbox[0].value == hook and app.query_params["hook"] == hook

    # live encoding of the reader's own text on the loaded model and SAE
    app.selectbox[0].set_value("blocks.1.hook_resid_pre").run()
    app.number_input[0].set_value(5).run()
    app.button[0].click().run()
    assert not app.exception and not app.error
    assert any("Peak" in c.value for c in app.caption)


def test_features_link_with_a_feature_out_of_range_is_one_clear_error(tiny_store: Path) -> None:
    app = AppTest.from_file(str(APP / "views" / "features.py"), default_timeout=60)
    app.session_state["store_path"] = str(tiny_store)
    app.query_params["feature"] = "999"
    app.run()
    assert not app.exception and "Feature '999' does not exist" in app.error[0].value


def test_features_page_names_a_missing_sae_folder(tiny_store: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy.duckdb"
    shutil.copy(tiny_store, copy)  # the store without its SAE folders beside it
    app = AppTest.from_file(str(APP / "views" / "features.py"), default_timeout=60)
    app.session_state["store_path"] = str(copy)
    app.run()
    app.button[0].click().run()
    assert not app.exception and "cfg.json missing" in app.error[0].value


def test_steering_page_generates_baseline_and_steered(tiny_store: Path) -> None:
    app = _page("steering", tiny_store)
    assert not app.exception and not app.error
    assert app.button[0].label == "Bypass refusal"
    app.button[0].click().run()  # the preset fills the prompt and picks ablation
    assert app.radio[0].value == "ablate" and app.text_area[0].value
    generate = next(b for b in app.button if b.label == "Generate")
    generate.click().run()
    assert not app.exception and not app.error
    assert [h.value for h in app.subheader][:2] == ["Baseline", "Steered"]
    scores = [m for m in app.metric if m.label == "Refusal score"]
    assert len(scores) == 2
    # batch results from the steering stage
    rates = store.read_table(tiny_store, "steering_rates")
    assert "Batch results (test split)" in [h.value for h in app.header] and set(rates["intervention"]) >= {"global"}
    specs = [chart.proto.spec for chart in app.get("vega_lite_chart")]
    assert any('"change in refusal rate"' in spec for spec in specs)  # the collateral matrix

    app.text_area[0].input("   ").run()
    next(b for b in app.button if b.label == "Generate").click().run()
    assert "The prompt is empty" in app.error[0].value


def test_circuits_page_shows_the_verdict_graph_and_heatmaps(tiny_store: Path) -> None:
    app = _page("circuits", tiny_store)
    assert not app.exception and not app.error
    assert [tab.label for tab in app.tabs][:3] == ["Verdict and similarity", "One category's circuit", "Heads and MLPs"]
    assert not app.dataframe and not app.slider  # the category's circuit is drawn only in its tab
    verdicts = store.read_table(tiny_store, "circuit_verdicts").set_index("kind")
    headings = [m.value for m in app.markdown if m.value.startswith("### ")]
    assert headings[0] == f"### Toxic prompts: **{verdicts.loc['toxic', 'label']}**"
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Permutation p"] == f"{verdicts.loc['hard', 'p_value']:.3g}"  # the last verdict shown
    assert metrics["Category share q"] == f"{verdicts.loc['hard', 'category_share']:.2f}"
    calibration = next(m.value for m in app.markdown if m.value.startswith("**Calibration (toxic)**"))
    assert f"says \"modular\" in {verdicts.loc['toxic', 'false_modular']:.0%} of studies" in calibration
    app.session_state["circuits_section"] = "One category's circuit"
    app.run()
    metrics = {m.label: m.value for m in app.metric}
    summary = store.read_table(tiny_store, "circuits").query("kind == 'toxic'").sort_values("category").iloc[0]
    assert metrics["Faithfulness (6 nodes)"] == f"{summary['faithfulness']:.0%}"
    assert metrics["Nodes / edges shown"].startswith("6 / ")
    nodes = app.dataframe[0].value
    assert nodes["dashboard"].dropna().str.startswith("features?hook=blocks.").all()
    app.slider[0].set_value(2).run()  # nodes at most
    assert not app.exception and {m.label: m.value for m in app.metric}["Nodes / edges shown"].startswith("2 / ")
    graph = next(c.proto.spec for c in app.get("vega_lite_chart") if '"href"' in c.proto.spec)  # the circuit graph
    assert '"href": {"field": "dashboard"' in graph  # a click opens a feature's dashboard (the table's links)
    app.session_state["circuits_section"] = "Verdict and similarity"
    app.run()
    next(r for r in app.radio if r.label == "Similarity").set_value("jaccard").run()
    assert not app.exception and not app.error
    charts = len(app.get("vega_lite_chart"))
    app.toggle(key="similarity_all").set_value(True).run()  # the all-circuits matrix only on request
    assert not app.exception and len(app.get("vega_lite_chart")) == charts + 1
    app.session_state["circuits_section"] = "Heads and MLPs"
    app.run()
    assert not app.exception and [m.value for m in app.markdown if m.value.endswith("by layer")] == [
        "**Attention output** by layer", "**MLP output** by layer"]


def test_circuits_page_draws_only_the_open_view_of_a_category(tiny_store: Path) -> None:
    app = _page("circuits", tiny_store)
    app.session_state["circuits_section"] = "One category's circuit"
    views = ["Graph and nodes", "Faithfulness against size", "Shared core and tail", "Attention heads"]
    drawn: dict[str, tuple[int, list[str]]] = {}
    for view in views:
        app.session_state["circuit_view"] = view
        app.run()
        assert not app.exception and not app.error and set(views) <= {tab.label for tab in app.tabs}
        drawn[view] = (len(app.dataframe), [m.value for m in app.markdown])
    graph_tables, _ = drawn["Graph and nodes"]
    assert graph_tables == 1  # the node table
    assert drawn["Shared core and tail"][0] == 2  # the core and the category's tail
    assert drawn["Faithfulness against size"][0] == drawn["Attention heads"][0] == 0
    assert any(text.startswith("Mean-ablating every node outside") for text in drawn["Faithfulness against size"][1])
    assert not any(text.startswith("Mean-ablating") for view in views[2:] for text in drawn[view][1])
    assert any(text.startswith("Attention heads by layer for") for text in drawn["Attention heads"][1])


def test_circuits_page_says_which_categories_had_too_few_prompts(tiny_store: Path, tmp_path: Path) -> None:
    import shutil

    import duckdb

    copy = tmp_path / "copy.duckdb"
    shutil.copy(tiny_store, copy)
    with duckdb.connect(str(copy)) as con:
        con.execute("UPDATE circuits SET status = 'skipped', message = 'hard/hate has 3 prompt(s); its statistics "
                    "need at least 8.' WHERE kind = 'hard' AND category = 'hate'")
    app = _page("circuits", copy)
    assert not app.exception
    assert "hard/hate**: hard/hate has 3 prompt(s)" in app.warning[0].value


def test_the_model_stack_warms_up_only_when_the_model_is_about_to_be_needed(tiny_store: Path, monkeypatch) -> None:
    """Opening Features does not start the background import of torch (it slowed the pages opened next);
    editing its own-text box does, and Steering starts it after drawing itself."""
    import app.context

    calls: list[str] = []
    monkeypatch.setattr(app.context, "warm_model_stack", lambda: calls.append("warm"))
    features = _page("features", tiny_store)
    assert not features.exception and calls == []
    features.text_area[0].input("A text of my own").run()
    assert not features.exception and calls == ["warm"]
    calls.clear()
    steering = _page("steering", tiny_store)
    assert not steering.exception and calls == ["warm"]


def test_prompt_browser_shows_where_the_judges_disagree(tiny_store: Path) -> None:
    from engine.stats import cohen_kappa

    app = _page("prompts", tiny_store)
    assert not app.exception and not app.error
    generations = store.read_table(tiny_store, "generations")
    judged = generations.query("split == 'test'")  # the page's default filter
    matrix = next(frame.value for frame in app.dataframe if "Cohen's kappa" in frame.value.columns)
    for row in matrix.to_dict("records"):
        own = judged[judged["model"] == row["model"]]
        assert row["answers"] == len(own)
        assert row["Cohen's kappa"] == pytest.approx(cohen_kappa(own["refused"], own["refused_by_score"]), nan_ok=True)
    labels = next(frame.value for frame in app.dataframe if "substring_judge" in frame.value.columns)
    split = (judged["refused"] != judged["refused_by_score"]).sum()
    assert len(labels) == min(split, 500) and (labels["substring_judge"] != labels["refusal_score_judge"]).all()
    app.toggle[0].set_value(False).run()
    labels = next(frame.value for frame in app.dataframe if "substring_judge" in frame.value.columns)
    assert len(labels) == min(len(judged), 500)


def test_feature_labels_query_finds_the_token_each_features_top_examples_peak_on(tiny_store: Path) -> None:
    from app import queries

    nodes = store.read_table(tiny_store, "circuit_nodes").query("feature >= 0")
    hooks, features = tuple(nodes["hook"].unique()), tuple(int(f) for f in nodes["feature"].unique())
    labels = queries.query(tiny_store, queries.FEATURE_LABELS_SQL, (hooks, features, hooks, features))
    examples = store.read_table(tiny_store, "feature_examples").merge(
        store.read_table(tiny_store, "sae_corpus")[["text_id", "tokens"]], on="text_id")
    checked = 0
    for row in labels.itertuples():
        own = examples[(examples["hook"] == row.hook) & (examples["feature"] == row.feature)]
        if own.empty:
            assert row.peak_token is None or pd.isna(row.peak_token)
            continue
        peaks = own.apply(lambda e: e["tokens"][e["position"]], axis=1).value_counts()
        assert row.peak_token in set(peaks[peaks == peaks.max()].index)  # a most common peak token
        checked += 1
    assert checked > 0


def test_directions_page_shows_the_independence_matrix_from_the_store(tiny_store: Path) -> None:
    app = _page("directions", tiny_store)
    assert not app.exception and not app.error
    specs = [chart.proto.spec for chart in app.get("vega_lite_chart")]
    assert any("representational independence" in spec for spec in specs)
    matrix = store.read_table(tiny_store, "direction_independence")
    off = matrix[matrix["a"] != matrix["b"]]
    captions = " ".join(c.value for c in app.caption)
    assert f"median {off['dependence'].median():.2f}" in captions


def test_steering_strength_reads_the_nearest_precomputed_addition_point(tiny_store: Path) -> None:
    app = _page("steering", tiny_store, direction_mode="add")
    assert not app.exception and not app.error
    sweep = store.read_table(tiny_store, "addition_tradeoff").query("strength == 1.0").set_index("kind")
    caption = next(c.value for c in app.caption if c.value.startswith("Precomputed at strength"))
    assert caption.startswith("Precomputed at strength 1 x the norm (this alpha is 1.00 x)")  # the default alpha
    for kind, row in sweep.iterrows():
        assert f"{kind} {row['rate']:.0%} ({int(row['n_refused'])}/{int(row['n'])})" in caption
    norm = float(store.read_table(tiny_store, "refusal_directions").query("scope == 'global' and chosen")["norm"].iloc[0])
    app = _page("steering", tiny_store, direction_mode="add", alpha=0.3 * norm)  # the slider starts there
    caption = next(c.value for c in app.caption if c.value.startswith("Precomputed at strength"))
    assert caption.startswith("Precomputed at strength 0.25 x the norm")  # the nearest point to 0.3


def test_directions_page_shows_the_addition_sweep(tiny_store: Path) -> None:
    app = _page("directions", tiny_store)
    assert not app.exception and not app.error
    assert any("inducing refusal: addition" in chart.proto.spec for chart in app.get("vega_lite_chart"))
    safe = store.read_table(tiny_store, "addition_tradeoff").query("kind == 'safe' and strength == 1.0").iloc[0]
    captions = " ".join(c.value for c in app.caption)
    assert f"at strength 1 the KL on safe prompts is {safe['mean_kl']:.3f}" in captions
    unsteered = store.read_table(tiny_store, "addition_tradeoff").query("kind == 'safe' and strength == 0").iloc[0]
    assert (f"the cross-entropy of the model's own safe answers {safe['mean_ce']:.3f} nats/token "
            f"[{safe['ce_low']:.3f}, {safe['ce_high']:.3f}], against {unsteered['mean_ce']:.3f} unsteered") in captions
    spec = next(chart.proto.spec for chart in app.get("vega_lite_chart") if "removing refusal" in chart.proto.spec)
    assert "CE of safe answers (nats/token)" in spec and "CE unablated" in spec  # on hover, both halves


def test_directions_page_shows_the_answers_at_the_chosen_directions_ablation_until_a_point_is_clicked(
        tiny_store: Path) -> None:
    app = _page("directions", tiny_store)
    assert not app.exception and not app.error
    spec = next(chart.proto.spec for chart in app.get("vega_lite_chart") if "removing refusal" in chart.proto.spec)
    assert '"picked"' in spec and "inducing refusal" in spec  # both halves, one click selection
    stored = store.read_table(tiny_store, "tradeoff_answers").query("point == 'weight 1'")
    shown = next(frame.value for frame in app.dataframe if "response" in frame.value.columns and "prompt" in frame.value.columns)
    assert sorted(shown["response"]) == sorted(stored["response"])
    assert any("Answers at weight 1" in m.value for m in app.markdown)


def test_features_page_shows_backup_recovery_and_gains_from_the_store(tiny_store: Path) -> None:
    app = _page("features", tiny_store, features_view="SAE quality and refusal-aligned features")
    assert not app.exception and not app.error
    recovery = store.read_table(tiny_store, "backup_recovery")
    shown = next(frame.value for frame in app.dataframe if "recovered_share" in frame.value.columns)
    assert shown["k"].tolist() == recovery["k"].tolist() == [1, 3, 10]
    gains = next(frame.value for frame in app.dataframe if "gain" in frame.value.columns)
    stored = store.read_table(tiny_store, "backup_gains").query("k == 1").sort_values("gain", ascending=False)
    assert gains["feature"].tolist() == stored["feature"].tolist()


def test_the_cross_entropy_sentence_is_left_out_for_a_store_built_without_it() -> None:
    import pandas as pd

    from app.narrative import answer_ce_text

    sweep = pd.DataFrame({"mean_kl": [0.0, 0.1]}, index=[0.0, 1.0])
    assert answer_ce_text(sweep, 1.0) == ""
    measured = sweep.assign(mean_ce=[1.0, 2.0], ce_low=[0.9, 1.8], ce_high=[1.1, 2.2])
    assert answer_ce_text(measured, 1.0) == (" and the cross-entropy of the model's own safe answers 2.000 nats/token "
                                             "[1.800, 2.200], against 1.000 unsteered")
