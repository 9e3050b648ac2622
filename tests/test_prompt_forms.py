"""Prompt form (opener, sentence type), form balance, and the matched benign sample of the fine-tune."""

from __future__ import annotations

import pandas as pd
import pytest

from engine.data.prompt_forms import form_balance, matched_sample, opener, sentence_type
from engine.data.prompt_sources import load_builtin, load_refusal_direction
from engine.tuning import TuneConfig, training_prompts
from precompute.config import load_config
from precompute.stages.tune import TuneStage
from tests.conftest import shared_dataset


@pytest.mark.parametrize(("text", "first", "kind"), [
    ("How do I kill a Python process?", "how", "question"),
    ("What\u2019s the capital of Peru", "what's", "question"),
    ("Explain photosynthesis.", "explain", "imperative"),
    ("Write a poem. Is that fine?", "write", "question"),
    ("My neighbour's dog barks all night, what can I do", "my", "first_person"),
    ("  Help me draft a letter", "help", "imperative"),
    ("", "", "imperative"),
])
def test_opener_and_sentence_type(text: str, first: str, kind: str) -> None:
    assert opener(text) == first
    assert sentence_type(text) == kind


def test_form_balance_measures_shares_and_opener_distance() -> None:
    balance = form_balance(["Write a", "Write b", "How c?", "Tell d"], ["Write e", "What f?", "What g?", "Give h"])
    assert balance.type_shares.loc["question"].tolist() == [0.25, 0.5]
    assert balance.max_type_gap == pytest.approx(0.25)
    # openers: a = write .5, how .25, tell .25; b = write .25, what .5, give .25 -> TV = (.25+.25+.25+.5+.25)/2
    assert balance.opener_distance == pytest.approx(0.75)
    assert form_balance(["Write a"], ["Write b"]).opener_distance == 0


def test_matched_sample_follows_the_targets_openers_given_what_is_already_there() -> None:
    targets = ["Write x"] * 6 + ["How y?"] * 3 + ["Help z"]
    pool = [f"Write p{i}" for i in range(20)] + [f"How q{i}?" for i in range(20)] + [f"Name r{i}" for i in range(20)]
    already = ["How a?", "How b?", "How c?"]  # questions over-represented before the draw
    picked = matched_sample(targets, pool, 7, seed=0, already=already)
    assert len(picked) == len(set(picked)) == 7
    drawn = [pool[i] for i in picked]
    # The whole side (3 + 7 = 10) should open like the targets: 6 Write, 3 How, 1 Help. No Help in the pool:
    # its place goes to an imperative (Write or Name), never to one more question.
    assert sum(t.startswith("Write") for t in drawn) >= 6
    assert sum(t.startswith("How") for t in drawn) == 0
    assert matched_sample(targets, pool, 7, seed=0, already=already).tolist() == picked.tolist()


def test_training_prompts_never_take_a_study_prompt_from_the_pool() -> None:
    study = pd.DataFrame({"id": ["t1", "t2", "s1", "x1"], "text": ["Write a threat", "How to stalk?", "Write a poem",
                                                                     "Write a song"],
                          "kind": ["toxic", "toxic", "safe", "safe"], "category": ["hate", "hate", "none", "none"],
                          "split": ["train", "train", "train", "test"], "source": "study"})
    pool = pd.DataFrame({"id": ["x1", "p1", "p2", "p3"], "text": ["Write a song", "Write a limerick", "How to bake?",
                                                                    "Name a tree"],
                         "kind": "safe", "category": "none", "split": "train", "source": "pool"})
    config = TuneConfig(plain_per_toxic=1.0, benign_sources=({"type": "table"},))
    chosen = training_prompts(study, pool, config)
    assert set(chosen["prompt_id"]) == {"t1", "t2", "s1", "p1", "p2"}  # x1 is a study test prompt
    assert "x1" not in set(chosen["prompt_id"])


def test_the_demo_tune_set_is_matched_in_form() -> None:
    """On the demo's actual training prompts (built-in balanced set plus Alpaca-style instructions drawn
    by training_prompts): harmful and benign sides in similar sentence-type and opener shares, far closer
    than the built-in set alone."""
    folder = shared_dataset("refusal_direction")
    pool = load_refusal_direction(folder, files=("harmless_train",))
    study = load_config("precompute/configs/demo.yaml")
    assert study.tune is not None

    def balance(variant: str, tune: TuneConfig):
        prompts = load_builtin(variant=variant)
        chosen = training_prompts(prompts, pool, tune, held_out=TuneStage._held_out(study, prompts))
        return form_balance(list(chosen.loc[chosen["kind"] == "toxic", "text"]),
                            list(chosen.loc[chosen["kind"] != "toxic", "text"]))

    demo = balance("balanced", study.tune)
    before = balance("original", TuneConfig())
    assert demo.max_type_gap <= 0.12 and demo.opener_distance <= 0.25
    assert before.max_type_gap >= 0.2 and before.opener_distance >= 0.5
    assert demo.n_b >= demo.n_a * 2
