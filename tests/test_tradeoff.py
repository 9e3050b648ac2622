"""The refusal / side-effect trade-off of directional ablation: weighted ablation, cones, the table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from engine.data import store
from engine.directions.scoring import AblationPoint, tradeoff_table
from engine.runtime.interventions import ablation_hooks
from engine.stats import wilson_interval
from precompute.stages.tradeoff import ABLATION_WEIGHTS, tradeoff_points


def test_weighted_ablation_removes_that_share_of_the_projection(tiny_model) -> None:
    direction = torch.randn(64)
    unit = direction / direction.norm()
    activation = torch.randn(2, 5, 64)
    for weight in (0.25, 1.0):
        _, project_out = ablation_hooks(tiny_model, direction, weight)[0]
        changed = project_out(activation, None)
        assert torch.allclose(changed @ unit, (1 - weight) * (activation @ unit), atol=1e-5)
        rest = activation - (activation @ unit)[..., None] * unit
        assert torch.allclose(changed - (changed @ unit)[..., None] * unit, rest, atol=1e-5)


def _point(source: str, size: float) -> AblationPoint:
    return AblationPoint(source, size, np.ones((1, 4), np.float32))


def test_tradeoff_table_counts_refusals_and_marks_the_pareto_front() -> None:
    points = [_point("weight", 0.5), _point("weight", 1.0), _point("cone", 2)]
    scores = {("weight", 0.5): [1.0, 2.0, -1.0, 3.0], ("weight", 1.0): [-1.0, 2.0, -1.0, -3.0],
              ("cone", 2): [-1.0, 2.0, -1.0, -3.0]}
    kls = {("weight", 0.5): [0.1, 0.1, 0.1], ("weight", 1.0): [0.2, 0.2, 0.2], ("cone", 2): [0.3, 0.3, 0.6]}
    rows = [pd.DataFrame({"source": s, "size": k, "kind": "toxic", "prompt": range(4), "value": v})
            for (s, k), v in scores.items()]
    rows += [pd.DataFrame({"source": s, "size": k, "kind": "safe", "prompt": range(3), "value": v})
             for (s, k), v in kls.items()]
    table = tradeoff_table(pd.concat(rows), points, n_boot=200, seed=0).set_index(["source", "size"])
    assert table.loc[("weight", 0.5), "n_refused"] == 3 and table.loc[("weight", 1.0), "rate"] == 0.25
    low, high = wilson_interval(1, 4)
    assert table.loc[("weight", 1.0), ["ci_low", "ci_high"]].tolist() == pytest.approx([low, high])
    assert table.loc[("cone", 2), "mean_kl"] == pytest.approx(0.4)
    assert table.loc[("cone", 2), "kl_low"] >= 0.3 and table.loc[("cone", 2), "kl_high"] <= 0.6
    # weight 0.5 (least KL) and weight 1.0 (least refusal at less KL than the cone) are the front
    assert table["pareto"].to_dict() == {("weight", 0.5): True, ("weight", 1.0): True, ("cone", 2): False}


def test_cones_rank_layers_at_the_chosen_position_by_their_validation_scores() -> None:
    d = 4
    directions = pd.DataFrame(
        [{"scope": "global", "layer": layer, "position": 2, "chosen": layer == 1, "vector": list(np.eye(d)[layer])}
         for layer in range(4)]
        + [{"scope": c, "layer": 1, "position": 2, "chosen": True, "vector": list(np.eye(d)[i])}
           for i, c in enumerate(["hate", "privacy"])])
    candidates = pd.DataFrame({
        "layer": [0, 1, 2, 3, 3], "position": [2, 2, 2, 2, 0],
        "ablation_score": [-1.0, 2.0, -3.0, -9.0, -20.0], "induce_score": [0.5, 1.0, 2.0, -1.0, 3.0]})
    points = tradeoff_points(directions, candidates)
    by_source = {(p.source, p.size): p for p in points}
    assert [p.size for p in points if p.source == "weight"] == list(ABLATION_WEIGHTS)
    # layer 3 does not induce refusal, the position-0 candidate is another site: cones are 2, 0, 1
    assert [p.sites for p in points if p.source == "cone"] == ["layers 2", "layers 2, 0", "layers 2, 0, 1"]
    assert np.array_equal(by_source[("cone", 2)].directions, np.stack([np.eye(d)[2], np.eye(d)[0]]))
    assert by_source[("categories", 2)].directions.shape == (2, d)
    assert np.array_equal(by_source[("weight", 0.5)].directions, np.eye(d)[1][None])


def test_full_weight_point_repeats_the_directions_stage_ablation(tiny_store) -> None:
    tradeoff = store.read_table(tiny_store, "ablation_tradeoff").set_index(["source", "size"])
    cross = store.read_table(tiny_store, "cross_ablation").query("ablated == 'global'")
    assert tradeoff.loc[("weight", 1.0), "n_toxic"] == cross["n"].sum()
    expected = float((cross["mean_refusal_score"] * cross["n"]).sum() / cross["n"].sum())
    assert tradeoff.loc[("weight", 1.0), "mean_refusal_score"] == pytest.approx(expected, abs=1e-4)
    assert (tradeoff["mean_kl"] >= 0).all() and tradeoff["pareto"].any()
    assert tradeoff.loc[("weight", 0.25), "mean_kl"] < tradeoff.loc[("weight", 1.0), "mean_kl"]


def test_independence_directions_are_the_chosen_one_and_the_categories_at_its_layer() -> None:
    from precompute.stages.tradeoff import independence_directions

    d = 4
    directions = pd.DataFrame(
        [{"scope": "global", "layer": layer, "chosen": layer == 1, "vector": list(np.eye(d)[layer])} for layer in range(3)]
        + [{"scope": c, "layer": layer, "chosen": True, "vector": list(np.eye(d)[3])}
           for c in ("hate", "privacy") for layer in (1, 2)])
    chosen = independence_directions(directions, alpha=None)
    assert list(chosen) == ["global", "hate", "privacy"]
    assert {site.layer for site in chosen.values()} == {1} and np.array_equal(chosen["global"].vector, np.eye(d)[1])


def test_the_stage_stores_the_independence_of_the_global_and_category_directions(tiny_store) -> None:
    matrix = store.read_table(tiny_store, "direction_independence")
    categories = store.read_table(tiny_store, "refusal_directions").query("scope != 'global'")["scope"].unique()
    names = {"global", *categories}
    assert set(matrix["a"]) == names and set(matrix["b"]) == names and len(matrix) == len(names) ** 2
    diagonal = matrix[matrix["a"] == matrix["b"]]
    assert (diagonal["dependence"] > 0.99).all()  # ablating a direction removes what adding it does
    assert (matrix["ci_low"] <= matrix["ci_high"]).all() and (matrix["n"] <= 32).all()


def test_addition_table_counts_refusals_per_strength_and_kind_and_the_kl_on_safe_prompts() -> None:
    from engine.directions.scoring import addition_table

    rows = [(0.0, "toxic", [1.0, -1.0], [np.nan] * 2), (0.0, "safe", [-1.0, -2.0, -3.0], [0.0, 0.0, 0.0]),
            (1.0, "toxic", [1.0, 2.0], [np.nan] * 2), (1.0, "safe", [1.0, -2.0, 3.0], [0.2, 0.4, 0.6])]
    per_prompt = pd.concat([pd.DataFrame({"strength": s, "kind": k, "prompt": range(len(v)), "score": v, "kl": kl})
                            for s, k, v, kl in rows])
    table = addition_table(per_prompt, n_boot=200, seed=0).set_index(["strength", "kind"])
    assert table.loc[(1.0, "safe"), "n_refused"] == 2 and table.loc[(1.0, "toxic"), "rate"] == 1.0
    assert table.loc[(0.0, "safe"), "mean_kl"] == 0.0 and table.loc[(1.0, "safe"), "mean_kl"] == pytest.approx(0.4)
    assert 0.2 <= table.loc[(1.0, "safe"), "kl_low"] <= 0.4 <= table.loc[(1.0, "safe"), "kl_high"] <= 0.6
    assert np.isnan(table.loc[(1.0, "toxic"), "mean_kl"])
    low, high = wilson_interval(2, 3)
    assert table.loc[(1.0, "safe"), ["ci_low", "ci_high"]].tolist() == pytest.approx([low, high])


def test_the_stage_sweeps_the_addition_strength_from_the_unsteered_model(tiny_store) -> None:
    from precompute.stages.tradeoff import ADDITION_STRENGTHS

    sweep = store.read_table(tiny_store, "addition_tradeoff")
    assert sorted(sweep["strength"].unique()) == list(ADDITION_STRENGTHS)
    generations = store.read_table(tiny_store, "generations").query("split == 'test' and model == 'other'")
    unsteered = sweep[sweep["strength"] == 0].set_index("kind")
    assert unsteered["n"].to_dict() == generations.groupby("kind").size().to_dict()
    assert unsteered.loc["safe", "mean_kl"] == pytest.approx(0.0, abs=1e-6)
    # strength 0 is the unsteered model: its refusal scores are the generate stage's
    expected = generations.groupby("kind")["refusal_score"].mean()
    assert unsteered["mean_refusal_score"].to_dict() == pytest.approx(expected.to_dict(), abs=1e-4)
    assert sweep.groupby("strength")["mean_refusal_score"].mean().nunique() == len(ADDITION_STRENGTHS)


def test_rdo_cones_join_the_tradeoff_when_asked_for(tmp_path, tiny_model_dir) -> None:
    from precompute import pipeline
    from precompute.config import parse_config
    from precompute.stages import STAGES
    from tests.conftest import tiny_study_settings

    settings = tiny_study_settings(tmp_path / "rdo.duckdb", tiny_model_dir)
    for section in ("evaluation", "saes", "steering", "circuits"):
        settings.pop(section)
    settings["directions"] |= {"rdo_steps": 3}
    config = parse_config(settings)
    pipeline.run_pipeline(config, STAGES)
    tradeoff = store.read_table(config.store, "ablation_tradeoff")
    rdo = tradeoff[tradeoff["source"] == "rdo"].set_index("size")
    assert sorted(rdo.index) == [1, 2, 3, 4] and (rdo["n_directions"] == rdo.index).all()
    assert (rdo["n_toxic"] == tradeoff["n_toxic"].iloc[0]).all()  # measured on the test prompts like the others
    # RDO's first direction joins the independence matrix, and ablating it removes what adding it does
    matrix = store.read_table(config.store, "direction_independence").set_index(["a", "b"])
    assert "rdo" in set(matrix.index.get_level_values("a")) and matrix.loc[("rdo", "rdo"), "dependence"] > 0.99
    # without rdo_steps the stage's inputs, and so every stored hash, are what they were
    from precompute.stages.tradeoff import TradeoffStage

    plain = parse_config(tiny_study_settings(tmp_path / "x.duckdb", tiny_model_dir))
    assert "rdo_steps" not in TradeoffStage().inputs(plain)
    # and asking for RDO on a built study re-runs the tradeoff stage only: the directions stage's inputs stay
    from precompute.stages.directions import DirectionsStage

    assert DirectionsStage().inputs(config) == DirectionsStage().inputs(plain)
    assert TradeoffStage().inputs(config) != TradeoffStage().inputs(plain)


def test_answers_at_the_points_are_the_directions_stage_answers_where_the_intervention_is_the_same(tiny_store) -> None:
    from precompute.stages.tradeoff import ADDITION_STRENGTHS, ANSWER_PROMPTS

    answers = store.read_table(tiny_store, "tradeoff_answers")
    points = store.read_table(tiny_store, "ablation_tradeoff")["point"].tolist()
    shown = answers.groupby("point")["kind"].agg(lambda k: tuple(sorted(k.value_counts().items())))
    per_kind = ANSWER_PROMPTS
    assert {p: shown[p] for p in points} == {p: (("safe", per_kind), ("toxic", per_kind)) for p in points}
    for strength in ADDITION_STRENGTHS:
        assert shown[f"strength {strength:g}"] == (("hard", per_kind), ("safe", per_kind))
    # weight 1 is the directions stage's ablation, strength 1 its addition (the direction's own norm): same
    # hooks, same prompts, same answers
    generated = store.read_table(tiny_store, "direction_generations").query("model == 'other'")
    for point, condition in (("weight 1", "ablation"), ("strength 1", "addition")):
        mine = answers[answers["point"] == point].set_index("prompt_id")
        theirs = generated[generated["condition"] == condition].set_index("prompt_id")
        common = mine.index.intersection(theirs.index)
        assert len(common) >= per_kind
        assert mine.loc[common, "response"].tolist() == theirs.loc[common, "response"].tolist()
    # strength 0 is the unsteered model
    unsteered = answers[answers["point"] == "strength 0"].set_index("prompt_id")
    baseline = generated[generated["condition"] == "baseline"].set_index("prompt_id")
    common = unsteered.index.intersection(baseline.index)
    assert unsteered.loc[common, "response"].tolist() == baseline.loc[common, "response"].tolist()


def test_a_rerun_redoes_only_the_parts_whose_inputs_changed(tmp_path, tiny_model_dir, monkeypatch) -> None:
    from precompute import pipeline
    from precompute.config import parse_config
    from precompute.stages import STAGES
    from precompute.stages import tradeoff as tradeoff_stage
    from tests.conftest import tiny_study_settings

    settings = tiny_study_settings(tmp_path / "parts.duckdb", tiny_model_dir)
    for section in ("evaluation", "saes", "steering", "circuits"):
        settings.pop(section)
    config = parse_config(settings)
    pipeline.run_pipeline(config, STAGES, until="tradeoff")
    before = store.read_table(config.store, "ablation_tradeoff")

    def measured_again(*args, **kwargs):
        raise AssertionError("an unchanged part was measured again")

    for name in ("ablation_tradeoff", "independence_matrix", "addition_sweep"):
        monkeypatch.setattr(tradeoff_stage, name, measured_again)
    monkeypatch.setattr(tradeoff_stage, "ANSWER_PROMPTS", 2)
    pipeline.run_pipeline(config, STAGES, until="tradeoff")
    answers = store.read_table(config.store, "tradeoff_answers")
    assert answers.groupby(["point", "kind"]).size().eq(2).all()
    pd.testing.assert_frame_equal(store.read_table(config.store, "ablation_tradeoff").drop(columns="run_id"),
                                  before.drop(columns="run_id"))


def test_the_tables_carry_the_safe_answers_cross_entropy_with_intervals() -> None:
    from engine.directions.scoring import addition_table

    points = [_point("weight", 1.0)]
    rows = pd.concat([
        pd.DataFrame({"source": "weight", "size": 1.0, "kind": "toxic", "prompt": range(2), "value": [1.0, -1.0]}),
        pd.DataFrame({"source": "weight", "size": 1.0, "kind": "safe", "prompt": range(3), "value": [0.1, 0.2, 0.3]}),
        pd.DataFrame({"source": "weight", "size": 1.0, "kind": "answer_ce", "prompt": range(3),
                      "value": [2.0, np.nan, 4.0]}),  # an empty answer has no cross-entropy
        pd.DataFrame({"source": "none", "size": 0, "kind": "answer_ce", "prompt": range(3), "value": [1.0, 1.5, 2.0]}),
    ])
    row = tradeoff_table(rows, points, n_boot=200, seed=0).iloc[0]
    assert row["mean_ce"] == pytest.approx(3.0) and row["baseline_ce"] == pytest.approx(1.5)
    assert 2.0 <= row["ce_low"] <= 3.0 <= row["ce_high"] <= 4.0
    without = tradeoff_table(rows[rows["kind"] != "answer_ce"], points, n_boot=200, seed=0).iloc[0]
    assert np.isnan(without["mean_ce"]) and np.isnan(without["baseline_ce"])
    sweep = pd.DataFrame({"strength": 1.0, "kind": ["safe", "safe", "toxic", "answer_ce", "answer_ce"],
                          "prompt": [0, 1, 0, 0, 1], "score": [1.0, -1.0, 2.0, np.nan, np.nan],
                          "kl": [0.1, 0.3, np.nan, np.nan, np.nan], "ce": [np.nan, np.nan, np.nan, 2.0, 3.0]})
    table = addition_table(sweep, n_boot=200, seed=0).set_index("kind")
    assert set(table.index) == {"safe", "toxic"} and table.loc["safe", "n"] == 2  # CE rows are not prompts' rows
    assert table.loc["safe", "mean_ce"] == pytest.approx(2.5) and np.isnan(table.loc["toxic", "mean_ce"])


def test_ablation_points_measure_the_answers_cross_entropy_under_their_own_ablation(tiny_model) -> None:
    from engine.directions.scoring import OwnAnswers, ablation_tradeoff
    from engine.runtime.interventions import applied
    from engine.runtime.scoring import completion_cross_entropy

    prompts = ["Write a poem about rain", "Name three fruits", "How do I bake bread?"]
    answers = ["Rain falls softly", "Apple, pear, plum", "Mix flour and water"]
    direction = np.random.default_rng(0).standard_normal((1, tiny_model.d_model)).astype(np.float32) * 5
    point = AblationPoint("weight", 1.0, direction)
    per_prompt = ablation_tradeoff(tiny_model, [point], prompts[:2], prompts, [5, 6], batch_size=8,
                                   own_answers=OwnAnswers(prompts, answers))
    measured = per_prompt[per_prompt["kind"] == "answer_ce"].set_index(["source", "prompt"])["value"]
    plain = completion_cross_entropy(tiny_model, prompts, answers, batch_size=8)
    with applied(tiny_model, ablation_hooks(tiny_model, torch.from_numpy(direction), 1.0)):
        ablated = completion_cross_entropy(tiny_model, prompts, answers, batch_size=8)
    assert measured.loc["none"].to_numpy() == pytest.approx(plain, abs=1e-5)
    assert measured.loc["weight"].to_numpy() == pytest.approx(ablated, abs=1e-5)
    assert not np.allclose(plain, ablated)  # the ablation changes what the answers cost


def test_the_stage_reads_the_same_unsteered_cross_entropy_in_both_sweeps(tiny_store) -> None:
    tradeoff = store.read_table(tiny_store, "ablation_tradeoff")
    sweep = store.read_table(tiny_store, "addition_tradeoff").set_index(["strength", "kind"])
    assert tradeoff["mean_ce"].notna().all() and (tradeoff["ce_low"] <= tradeoff["ce_high"]).all()
    assert "answer_ce" not in set(store.read_table(tiny_store, "addition_tradeoff")["kind"])
    # strength 0 is the unsteered model on the same safe prompts and answers as the ablation's baseline
    assert sweep.loc[(0.0, "safe"), "mean_ce"] == pytest.approx(tradeoff["baseline_ce"].iloc[0], abs=1e-6)
    assert sweep.xs("toxic", level="kind")["mean_ce"].isna().all()


def test_the_rdo_demo_config_is_the_demo_with_rdo_in_a_study_of_its_own() -> None:
    import yaml

    from engine.data.paths import REPO_ROOT

    read = lambda name: yaml.safe_load((REPO_ROOT / "precompute" / "configs" / name).read_text(encoding="utf-8"))
    demo, rdo = read("demo.yaml"), read("demo-rdo.yaml")
    assert (rdo.pop("store"), rdo.pop("study")) == ("data/stores/demo-rdo.duckdb", "demo-rdo")
    demo.pop("store"), demo.pop("study")
    assert rdo["directions"].pop("rdo_steps") == 60 and "rdo_steps" not in demo["directions"]
    assert rdo == demo
