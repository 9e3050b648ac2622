"""Nothing is measured on what it was fitted on: evaluation tables hold test prompts only, circuits
rank their nodes on other prompts than they measure them on and leave the fine-tune's own training
prompts out, and steering features are chosen by attribution on the train split."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd

from engine.data import store
from engine.runtime.activations import prompt_end_positions
from precompute.config import CircuitsConfig, SaesConfig
from precompute.stages import saes as saes_stage
from precompute.stages.circuits import CircuitsStage, ranking_rows

# Tables that measure a direction or an intervention, per prompt: the directions are fitted and
# the steered features chosen on the train split, so these must hold test prompts only.
EVALUATION_TABLES = ("direction_generations", "steering_generations")


def test_evaluation_tables_hold_test_prompts_only(tiny_store: Path) -> None:
    prompts = store.read_table(tiny_store, "prompts")
    train = set(prompts.loc[prompts["split"] == "train", "id"])
    for name in EVALUATION_TABLES:
        table = store.read_table(tiny_store, name)
        assert len(table) and not set(table["prompt_id"]) & train, name


def test_circuits_measure_on_prompts_they_did_not_rank_on(tiny_store: Path) -> None:
    used = store.read_table(tiny_store, "circuit_prompts")
    nodes = store.read_table(tiny_store, "circuit_nodes")
    faithfulness = store.read_table(tiny_store, "circuit_faithfulness")
    for (kind, category), group in used.groupby(["kind", "category"]):
        ranking = set(group.loc[group["part"] == "ranking", "prompt_id"])
        measured = set(group.loc[group["part"] == "measured", "prompt_id"])
        assert ranking and measured and not ranking & measured
        rows = nodes[(nodes["kind"] == kind) & (nodes["category"] == category)]
        assert (rows["n_prompts"] == len(ranking)).all()
        assert (rows["n_held_out"] == (group["part"] != "ranking").sum()).all()
        measured_rows = faithfulness[(faithfulness["kind"] == kind) & (faithfulness["category"] == category)]
        assert (measured_rows["n_prompts"] == len(measured)).all()


def test_ranking_rows_split_a_group_in_two_disjoint_halves() -> None:
    for n in (4, 9, 24):
        ranking, measured = ranking_rows(n)
        assert not set(ranking) & set(measured) and len(ranking) + len(measured) == n
        assert abs(len(ranking) - len(measured)) <= 1


def test_circuit_groups_leave_out_the_fine_tunes_training_prompts() -> None:
    prompts = pd.DataFrame({"id": [f"p{i}" for i in range(30)], "kind": "toxic",
                            "category": ["hate"] * 15 + ["privacy"] * 15, "text": [f"t{i}" for i in range(30)]})
    trained = {f"p{i}" for i in range(0, 30, 3)}
    settings = CircuitsConfig(kinds=("toxic",), max_prompts=48, min_prompts=4)
    groups, status = CircuitsStage._groups(prompts, settings, trained)
    assert all(not set(group["id"]) & trained for group in groups.values())
    assert sum(len(group) for group in groups.values()) == 20
    assert [row["n_trained_on"] for row in status] == [5, 5]
    # Too few left after leaving them out: the group is skipped and says so.
    groups, status = CircuitsStage._groups(prompts, CircuitsConfig(kinds=("toxic",), min_prompts=12), trained)
    assert not groups and {row["status"] for row in status} == {"skipped"}


def test_steering_features_are_chosen_on_the_train_split(tiny_store: Path, tiny_model, monkeypatch) -> None:
    """The attribution that picks the steered features reads train prompts only."""
    seen: list[str] = []
    real = saes_stage.metric_gradients

    def recording(model, texts, *args, **kwargs):
        seen.extend(texts)
        return real(model, texts, *args, **kwargs)

    monkeypatch.setattr(saes_stage, "metric_gradients", recording)
    prompts = store.read_table(tiny_store, "prompts")
    tokens = store.read_table(tiny_store, "refusal_tokens")
    context = SimpleNamespace(config=SimpleNamespace(saes=SaesConfig(attribution_prompts=1000, model="other")))
    saes_stage.SaesStage._attribution_inputs(context, tiny_model, prompts, ["blocks.1.hook_resid_pre"],
                                             prompt_end_positions(tiny_model.tokenizer).offsets, tokens, 8)
    toxic = prompts[prompts["kind"] == "toxic"]
    assert set(seen) == set(toxic.loc[toxic["split"] == "train", "text"])
