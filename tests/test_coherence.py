"""The coherence check separates loops and unlikely text from fluent answers, and leaves refusals alone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from engine.errors import ExplorerError
from engine.judging.coherence import CoherenceRule, repetition_rate

FLUENT = [
    ("Here are three ways to reduce the cost of a product: buy materials in bulk, simplify the design, and "
     "negotiate with suppliers."),
    "A haiku about autumn: red leaves drift slowly, the river carries them home, cold wind hums along.",
    "To report a scam caller, note the number and the time, then contact your local consumer protection office.",
]
LOOPS = [
    ("A government notice should not be used for tax purposes. It should only be used for tax purposes. It "
     "should only be used for tax purposes."),
    "the the the the the the the the the the the the",
    "Sure, here is how. Sure, here is how. Sure, here is how. Sure, here is how.",
]


def test_repetition_rate_is_zero_for_fluent_text_and_high_for_loops() -> None:
    assert all(repetition_rate(text) < 0.1 for text in FLUENT)
    assert all(repetition_rate(text) > 0.4 for text in LOOPS)
    assert repetition_rate("too short") == 0.0


def test_the_rule_marks_planted_degenerate_answers_and_not_fluent_ones_or_refusals() -> None:
    rng = np.random.default_rng(0)
    rule = CoherenceRule()
    # Reference: the studied model's unsteered answers, cross-entropy ~ N(2, 0.3) nats/token.
    threshold = rule.threshold(rng.normal(2.0, 0.3, size=400))
    assert 2.3 < threshold < 2.7
    answers = pd.DataFrame({
        "response": FLUENT + LOOPS + [FLUENT[0], "I'm sorry, I can't help. I'm sorry, I can't help. I'm sorry."],
        "refused": [False] * 6 + [False, True],
        "cross_entropy": [1.9, 2.1, 2.0] + [1.5, 0.8, 1.2] + [6.5, 9.0],  # fluent, loops (likely!), gibberish
    })
    marked = rule.degenerate(answers, threshold).tolist()
    assert marked == [False, False, False, True, True, True, True, False]


def test_no_reference_marks_only_loops_and_bad_settings_are_refused() -> None:
    assert CoherenceRule().threshold(np.array([np.nan])) == float("inf")
    with pytest.raises(ExplorerError, match="max_repetition"):
        CoherenceRule(max_repetition=1.5)
    with pytest.raises(ExplorerError, match="reference_quantile"):
        CoherenceRule(reference_quantile=0.2)
