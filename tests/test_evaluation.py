"""Stage `evaluation`: held-out prompt sets answered by every model, never a prompt fitted or trained on."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from engine.data import store
from engine.errors import ExplorerError
from precompute.config import EvaluationConfig
from precompute.stages.evaluation import held_out


def test_held_out_drops_and_counts_fitted_prompts() -> None:
    prompts = pd.DataFrame({"id": ["a", "b", "c"], "text": ["x", "y", "z"]})
    kept, n_left_out = held_out(prompts, {"b", "q"})
    assert kept["id"].tolist() == ["a", "c"] and n_left_out == 1


def test_evaluation_tables_hold_only_held_out_prompts_and_count_them(tiny_store: Path) -> None:
    prompts = store.read_table(tiny_store, "prompts")
    generations = store.read_table(tiny_store, "evaluation_generations")
    rates = store.read_table(tiny_store, "evaluation_rates")
    train = prompts[prompts["split"] == "train"]
    # The set is the built-in set again: its train prompts are the study's fitting prompts, all left out.
    assert not generations["prompt_id"].isin(train["id"]).any()
    assert set(generations["prompt_id"]) == set(prompts.loc[prompts["split"] == "test", "id"])
    held = rates[rates["set"] == "builtin_again"]
    assert set(held["n_left_out"]) == {len(train)}
    assert set(generations["model"]) == {"base", "other"}
    # Rates agree with a count over the answers.
    hand = generations.groupby(["model", "kind"])["refused"].agg(["size", "sum"])
    for row in held.itertuples():
        assert (row.n, row.n_refused) == tuple(hand.loc[(row.model, row.kind)])
        assert row.ci_low <= row.rate <= row.ci_high
    # The study's own hard test prompts are listed beside the sets, counted from `generations`.
    study = store.read_table(tiny_store, "generations").query("kind == 'hard' and split == 'test'")
    hard = rates[rates["set"] == "study_hard_test"].set_index("model")
    for model, group in study.groupby("model"):
        assert (hard.loc[model, "n"], hard.loc[model, "n_refused"]) == (len(group), group["refused"].sum())


@pytest.mark.parametrize(("settings", "message"), [
    ({"sets": []}, "evaluation.sets is empty"),
    ({"sets": [{"name": "x"}]}, "lacks a name or a source"),
    ({"sets": [{"name": "x", "source": {"type": "builtin"}}] * 2}, "names repeat"),
    ({"sets": [{"name": "x", "source": {"type": "builtin"}}], "max_new_tokens": 0}, "out of range"),
])
def test_evaluation_config_errors(settings: dict, message: str) -> None:
    with pytest.raises(ExplorerError, match=message):
        EvaluationConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})


def test_judge_agreement_is_measured_on_answers_the_refusal_tokens_were_not_read_off(tiny_store: Path) -> None:
    generations = store.read_table(tiny_store, "generations")
    agreement = store.read_table(tiny_store, "judge_agreement").query("kind == 'all'").set_index("model")
    for model, group in generations.groupby("model"):
        assert 0.3 < group["token_fit"].mean() < 0.7
        assert agreement.loc[model, "n"] == (~group["token_fit"]).sum()
