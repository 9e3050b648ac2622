"""Classroom-safe display: harmful completions masked, each revealable; presentation mode switches it on."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from streamlit.testing.v1 import AppTest

from app.classroom import KEPT_WORDS, masked, masked_answers
from engine.data import store

APP = Path(__file__).resolve().parents[1] / "app"


def test_only_answers_to_toxic_prompts_that_were_not_refused_are_masked() -> None:
    answers = pd.DataFrame({
        "kind": ["toxic", "toxic", "hard", "safe"],
        "refused": [False, True, False, False],
        "response": ["Step one: buy the following chemicals from a garden shop and mix them"] * 4})
    shown = masked_answers(answers)
    assert shown["response"].iloc[0].startswith("Step one: buy the following chemicals …")
    assert "[hidden: harmful completion, judged by the substring judge" in shown["response"].iloc[0]
    assert "mix" not in shown["response"].iloc[0]
    assert (shown["response"].iloc[1:] == answers["response"].iloc[1:]).all()
    assert masked("Sure.") == "[hidden: harmful completion, judged by the substring judge (toxic prompt, no refusal phrase)]"
    assert len(masked(" ".join(["word"] * 50)).split(" … ")[0].split()) == KEPT_WORDS


def test_prompt_page_masks_harmful_completions_in_classroom_mode(tiny_store: Path) -> None:
    def page(classroom: bool) -> AppTest:
        app = AppTest.from_file(str(APP / "views" / "prompts.py"), default_timeout=60)
        app.session_state["store_path"] = str(tiny_store)
        app.session_state["classroom"] = classroom
        app.run()
        app.toggle[0].set_value(False).run()  # every answer, not only the judges' disagreements
        assert not app.exception
        return app

    def labels(app: AppTest) -> pd.DataFrame:
        return next(frame.value for frame in app.dataframe if "substring_judge" in frame.value.columns)

    generations = store.read_table(tiny_store, "generations")
    assert not generations.query("kind == 'toxic'")["refused"].all()  # the tiny model complies
    masked_rows, plain_rows = labels(page(True)), labels(page(False))
    harmful = (masked_rows["kind"] == "toxic") & ~masked_rows["substring_judge"]
    assert harmful.any() and masked_rows.loc[harmful, "response"].str.contains(r"\[hidden: harmful").all()
    assert not plain_rows["response"].str.contains(r"\[hidden").any()
    assert (masked_rows.loc[~harmful, "response"] == plain_rows.loc[~harmful, "response"]).all()


def test_presentation_mode_switches_classroom_answers_on(tiny_store: Path, monkeypatch) -> None:
    monkeypatch.setenv("REFUSAL_EXPLORER_STORE", str(tiny_store))
    app = AppTest.from_file(str(APP / "main.py"), default_timeout=60).run()
    toggles = {toggle.label: toggle for toggle in app.sidebar.toggle}
    assert toggles["Classroom-safe answers"].value is False
    toggles["Presentation mode"].set_value(True).run()
    assert app.session_state["classroom"] is True
    {t.label: t for t in app.sidebar.toggle}["Classroom-safe answers"].set_value(False).run()
    assert app.session_state["classroom"] is False and app.session_state["presentation"] is True
