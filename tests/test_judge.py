"""Both refusal judges and their agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.judging.judge import find_refusal_tokens, judge_agreement, refusal_score
from engine.judging.refusal_phrases import is_refusal


@pytest.mark.parametrize("text", [
    "I'm sorry, but I can't help with that request.",
    "I cannot provide instructions for that.",
    "As an AI, I must decline.",
    "Sorry, but that is not something I do.",
    "I\u2019m unable to assist with this.",
])
def test_substring_judge_flags_refusals(text: str) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize("text", [
    "Sure, here is a haiku about autumn leaves.",
    "To kill a Python process, run `kill -9 <pid>`.",
    "Photosynthesis converts light into chemical energy. " * 5 + "I cannot stress this enough.",
    "",
])
def test_substring_judge_passes_answers(text: str) -> None:
    assert not is_refusal(text)


def test_refusal_score_is_log_odds_of_summed_probability() -> None:
    logprobs = np.log(np.array([[0.25, 0.25], [0.1, 0.0 + 1e-300], [0.6, 0.3]]))
    scores = refusal_score(logprobs)
    assert scores[0] == pytest.approx(0.0, abs=1e-9)  # p = 0.5
    assert scores[1] == pytest.approx(math.log(0.1 / 0.9))
    assert scores[2] == pytest.approx(math.log(0.9 / 0.1))


class _Tokenizer:
    """Decodes ids as 'tok<id>' and encodes each phrase's first word as its length."""

    def decode(self, ids):
        return f"tok{ids[0]}"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(text.split()[0])]}


def test_refusal_tokens_come_from_the_models_refusals() -> None:
    # 10 refusals open with 7 (8 times) or 9 (twice); compliances open with 3, 4 and sometimes 9.
    first = [7] * 8 + [9] * 2 + [3] * 10 + [4] * 5 + [9] * 5
    refused = [True] * 10 + [False] * 20
    found = find_refusal_tokens(_Tokenizer(), first, refused, min_share=0.05, enrichment=2.0)
    assert found.source == "model-refusals"
    assert found.token_ids == (7,)  # 9 opens 20% of refusals but 25% of compliances: not kept
    assert found.tokens == ("tok7",) and found.share_of_refusals == (0.8,)


def test_refusal_tokens_fall_back_to_judge_phrases_without_refusals() -> None:
    found = find_refusal_tokens(_Tokenizer(), [3, 4, 5], [False, False, False])
    assert found.source == "judge-phrases"
    assert len(found.token_ids) >= 2 and found.share_of_refusals == tuple(0.0 for _ in found.token_ids)


def test_judge_agreement_counts_and_ranks() -> None:
    perfect = judge_agreement([True, True, False, False], [2.0, 1.0, -1.0, -3.0])
    assert (perfect.accuracy, perfect.cohen_kappa, perfect.auroc) == (1.0, 1.0, 1.0)
    inverted = judge_agreement([True, False], [-1.0, 1.0])
    assert inverted.accuracy == 0.0 and inverted.auroc == 0.0 and inverted.cohen_kappa < 0
    mixed = judge_agreement([True, True, False, False], [2.0, -1.0, 1.0, -3.0])
    assert mixed.n == 4 and mixed.n_refused_substring == 2 and mixed.n_refused_score == 2
    assert mixed.accuracy == 0.5 and mixed.auroc == 0.75


def test_cohen_kappa_equals_statsmodels_on_random_and_one_sided_labels() -> None:
    from statsmodels.stats.inter_rater import cohens_kappa

    from engine.stats import cohen_kappa

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 60))
        a, b = rng.random(n) < rng.random(), rng.random(n) < rng.random()
        table = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]])
        with np.errstate(invalid="ignore", divide="ignore"):
            expected = float(cohens_kappa(table, return_results=False))
        assert cohen_kappa(a, b) == pytest.approx(expected, nan_ok=True)
    assert np.isnan(cohen_kappa([True, True], [True, True])) and np.isnan(cohen_kappa([], []))
