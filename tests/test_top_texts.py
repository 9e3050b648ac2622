"""Top texts that teach: a window around the peak, one entry per prompt, and a spread-out ordering."""

from __future__ import annotations

import pandas as pd

from app.components import top_text_html
from app.top_texts import diverse_order, one_per_prompt, peak_window


def _examples() -> pd.DataFrame:
    rows = [  # rank, prompt, kind, category
        (0, "p1", "toxic", "hate"), (1, "p1", "toxic", "hate"), (2, "p2", "toxic", "hate"),
        (3, "p3", "toxic", "hate"), (4, "p4", "hard", "privacy"), (5, "p1", "toxic", "hate"),
        (6, "p5", "safe", "none")]
    return pd.DataFrame(rows, columns=["rank", "prompt_id", "kind", "category"]).assign(
        activation=lambda f: 10.0 - f["rank"], source="tuned")


def test_peak_window_keeps_the_tokens_around_the_peak() -> None:
    window = peak_window(100, 50, width=12)
    assert (window.start, window.stop, window.peak) == (38, 63, 12)
    assert peak_window(10, 2, width=12) == peak_window(10, 2, width=12) and peak_window(10, 2).start == 0
    assert peak_window(10, 9, width=3).stop == 10


def test_one_entry_per_prompt_keeps_its_strongest_transcript() -> None:
    entries, others = one_per_prompt(_examples())
    assert entries["prompt_id"].tolist() == ["p1", "p2", "p3", "p4", "p5"]
    assert entries.set_index("prompt_id").loc["p1", "rank"] == 0
    assert sorted(others["rank"].tolist()) == [1, 5] and set(others["prompt_id"]) == {"p1"}


def test_spread_order_puts_one_entry_of_each_group_first() -> None:
    entries, _ = one_per_prompt(_examples())
    spread = diverse_order(entries)
    first_three = spread.head(3)
    assert set(zip(first_three["kind"], first_three["category"])) == {("toxic", "hate"), ("hard", "privacy"),
                                                                       ("safe", "none")}
    assert spread["prompt_id"].tolist() == ["p1", "p4", "p5", "p2", "p3"]  # then the rest, strongest first
    assert sorted(spread["rank"]) == sorted(entries["rank"])


def test_an_entry_shows_the_window_and_folds_the_rest() -> None:
    tokens = [f"t{i}" for i in range(60)]
    activations = [0.0] * 60
    activations[40] = 3.0
    example = pd.Series({"rank": 0, "activation": 3.0, "position": 40, "tokens": tokens,
                         "token_activations": activations, "kind": "toxic", "category": "hate", "source": "tuned",
                         "prompt_id": "p1", "prompt_tokens": 30})
    other = pd.DataFrame([example.to_dict() | {"rank": 2, "source": "base"}])
    page = top_text_html(pd.DataFrame([example]).itertuples().__next__(), other, 3.0)
    shown_window, folded = page.split("<details>", 1)
    assert "t28" in shown_window and "t52" in shown_window  # 12 either side of the peak
    assert "t27" not in shown_window and "t53" not in shown_window and "t0" not in shown_window
    assert "t0" in folded and "whole transcript (60 tokens" in folded
    assert "1 other transcript(s) of this prompt" in page and "#3 · peak 3.00 · base" in page


def test_classroom_mode_cuts_a_harmful_answer_after_its_first_words_and_keeps_refusals() -> None:
    prompt = [f"p{i}" for i in range(10)]
    complied = prompt + ["Sure", ",", " here", " is", " how", " to", " make", " it", " at", " home"]
    refused = prompt + ["I", "'m", " sorry", ",", " I", " can", "'t", " help", " with", " that"]

    def entry(tokens: list[str], kind: str = "toxic") -> str:
        row = pd.DataFrame([{"rank": 0, "activation": 1.0, "position": 12, "tokens": tokens,
                             "token_activations": [0.5] * len(tokens), "kind": kind, "category": "hate",
                             "source": "tuned", "prompt_id": "p", "prompt_tokens": 10}])
        return top_text_html(next(row.itertuples()), row.iloc[:0], 1.0, classroom=True)

    masked = entry(complied)
    shown, revealed = masked.split("<details>", 1)
    assert " how" in shown and " make" not in shown and "[hidden: harmful completion" in shown
    assert " home" in revealed  # one click away
    assert "[hidden" not in entry(refused) and " that" in entry(refused)
    assert "[hidden" not in entry(complied, kind="hard")
