"""The router page: one entry per store in the picker, whatever path form names it."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

MAIN = Path(__file__).resolve().parents[1] / "app" / "main.py"


def test_store_picker_lists_each_store_once(isolated_data_dir: Path, monkeypatch) -> None:
    stores = isolated_data_dir / "stores"
    stores.mkdir(parents=True)
    (stores / "demo.duckdb").write_text("")
    (stores / "other.duckdb").write_text("")
    monkeypatch.chdir(isolated_data_dir.parent)
    monkeypatch.setenv("REFUSAL_EXPLORER_STORE", "data/stores/demo.duckdb")  # relative on purpose
    app = AppTest.from_file(str(MAIN), default_timeout=60).run()
    options = app.sidebar.selectbox[0].options
    assert sorted(options) == ["demo", "other"]


def test_two_stores_with_one_name_keep_the_chosen_one(isolated_data_dir: Path, monkeypatch, tmp_path: Path) -> None:
    stores = isolated_data_dir / "stores"
    stores.mkdir(parents=True)
    (stores / "demo.duckdb").write_text("")
    elsewhere = tmp_path / "copied" / "demo.duckdb"
    elsewhere.parent.mkdir()
    elsewhere.write_text("")
    monkeypatch.setenv("REFUSAL_EXPLORER_STORE", str(elsewhere))
    app = AppTest.from_file(str(MAIN), default_timeout=60).run()
    assert app.session_state["store_path"] == str(elsewhere.resolve())
    app.run()  # a rerun (any click) keeps the same store
    assert app.session_state["store_path"] == str(elsewhere.resolve())
    assert set(app.sidebar.selectbox[0].options) == {str(elsewhere.resolve()), str((stores / "demo.duckdb").resolve())}
