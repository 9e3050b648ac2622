"""The pure parts of the browser driver and the app benchmark (no browser, no server)."""

from __future__ import annotations

import ast
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest

from app import labels
from engine.data.paths import REPO_ROOT
from engine.errors import ExplorerError
from precompute.__main__ import build_parser
from tools.browser import bench, driver
from tools.browser.bench import INTERACTIONS, interaction_rows, page_rows
from tools.browser.driver import NavPage, Timing, interaction_seconds, nav_title, parse_nav_links

BASE = "http://127.0.0.1:8501"
VIEWS = REPO_ROOT / "app" / "views"
TAB_LABELS = {value for name, value in vars(labels).items() if name.endswith("_TABS")}


def test_nav_title_drops_the_icon_ligature() -> None:
    assert nav_title("bar_chart\n\nOverview") == "Overview"
    assert nav_title("Compare studies") == "Compare studies"
    assert nav_title("  \n") == ""


def test_nav_links_become_pages_in_order_without_externals_or_duplicates() -> None:
    links = [
        {"text": "lightbulb\n\nFindings", "href": f"{BASE}/", "target": None},
        {"text": "explore\n\nDirections", "href": f"{BASE}/directions", "target": None},
        {"text": "hub\n\nFeatures", "href": "/features", "target": None},  # relative
        {"text": "Docs", "href": "https://example.org/docs", "target": "_blank"},
        {"text": "Elsewhere", "href": "http://other.host/page", "target": None},
        {"text": "explore\n\nDirections", "href": f"{BASE}/directions/", "target": None},
        {"text": "No link", "href": None, "target": None},
    ]
    assert parse_nav_links(links, BASE) == [
        NavPage("Findings", ""), NavPage("Directions", "directions"), NavPage("Features", "features")]


def test_nav_links_under_a_base_path() -> None:
    links = [{"text": "Report", "href": "http://h:1/app/report", "target": None},
             {"text": "Out", "href": "http://h:1/other", "target": None}]
    assert parse_nav_links(links, "http://h:1/app") == [NavPage("Report", "report")]


def test_interaction_is_timed_from_its_last_input_to_the_rerun_painted() -> None:
    runs = [
        {"t": 50.0, "state": "notRunning", "old": "running", "painted": 60.0},  # an earlier run
        {"t": 1250.0, "state": "running", "old": "notRunning", "painted": 1260.0},
        {"t": 1400.0, "state": "notRunning", "old": "running", "painted": None},  # not painted yet
    ]
    inputs = [900.0, 1000.0, 1200.0, 1300.0]  # opening a selectbox, picking; 1300 came after the run started
    assert interaction_seconds(runs, inputs, since=950.0) is None
    runs[-1]["painted"] = 1432.0
    timing = interaction_seconds(runs, inputs, since=950.0)
    assert timing.seconds == pytest.approx((1432.0 - 1200.0) / 1000)
    assert timing.script == pytest.approx((1400.0 - 1250.0) / 1000)
    assert interaction_seconds(runs, [], since=950.0).seconds == pytest.approx((1432.0 - 950.0) / 1000)


def test_timing_summary_and_table_rows() -> None:
    fast = Timing("Overview", (0.9, 0.5, 0.7), target=2.0, cold=2.6, extra=(1.1, 1.3))
    slow = Timing("Circuits", (2.5, 2.1, 3.0), target=2.0, cold=1.9)
    assert fast.median == pytest.approx(0.7) and fast.passed and fast.cold_passed is False
    assert fast.extra_median == pytest.approx(1.2)
    assert not slow.passed and slow.cold_passed and slow.extra_median is None
    empty = Timing("gone", (), target=0.3)
    assert math.isnan(empty.median) and not empty.passed and empty.cold_passed is None
    assert page_rows([fast, slow]) == [
        ("Overview", "2.60", "0.70", "1.20", "2", "PASS", "FAIL"),
        ("Circuits", "1.90", "2.50", "—", "2", "FAIL", "PASS")]
    click = Timing("Directions: colour by: radio", (0.21, 0.35, 0.25), target=0.3, extra=(0.1, 0.2, 0.12))
    assert interaction_rows([click]) == [("Directions: colour by: radio", "0.25", "0.35", "0.12", "0.3", "PASS")]


def test_missing_chromium_says_how_to_install_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(ExplorerError, match="apt-get install chromium"):
        driver.chromium_path()
    binary = tmp_path / "chromium"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("CHROMIUM", str(binary))
    assert driver.chromium_path() == binary


def test_bench_only_app_is_an_option_and_needs_a_store(tmp_path, caplog) -> None:
    from precompute.__main__ import main

    args = build_parser().parse_args(["bench", "--only", "app", "--repeats", "2"])
    assert (args.only, args.repeats) == ("app", 2)
    config = tmp_path / "c.yaml"
    config.write_text("study: x\nmodels: {base: m}\n")
    with caplog.at_level(logging.ERROR, logger="precompute"):
        assert main(["bench", "--only", "app", "--config", str(config), "--store", str(tmp_path / "no.duckdb")]) == 2
    assert "No study store at" in caplog.text


def _tab_lists(view: Path) -> list[tuple[str, ...]]:
    """The tab labels each `tab_views(...)` or `st.tabs(...)` call of a view passes: a name, from app.labels."""
    found = []
    for node in ast.walk(ast.parse(view.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if called in ("tab_views", "tabs"):
            labels_arg = node.args[0]
            assert isinstance(labels_arg, ast.Name) and getattr(labels, labels_arg.id, None) in TAB_LABELS, (
                f"{view.name}:{node.lineno}: tab labels not one of app.labels' *_TABS")
            found.append(getattr(labels, labels_arg.id))
    return found


def _string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_the_views_take_their_tab_labels_from_app_labels() -> None:
    every_label = {label for tabs in TAB_LABELS for label in tabs}
    used = []
    for view in sorted(VIEWS.glob("*.py")):
        used += _tab_lists(view)
        assert not _string_literals(view) & every_label, f"{view.name} spells out a tab label of app.labels"
    assert set(used) == TAB_LABELS  # every list of app.labels is some view's tabs


def test_the_app_bench_opens_tabs_by_the_views_constants() -> None:
    opened = [interaction for interaction in INTERACTIONS if interaction.tab is not None]
    assert opened
    for interaction in opened:
        view = VIEWS / f"{interaction.page.lower()}.py"  # the page's view (Features: features.py)
        shown = {label for tabs in _tab_lists(view) for label in tabs}
        assert interaction.tab in shown, f"{interaction.page}: {interaction.name} opens a tab the view has not"
    every_label = {label for tabs in TAB_LABELS for label in tabs}
    assert not _string_literals(Path(bench.__file__)) & every_label, "the bench spells out a tab label"


def test_the_labels_import_neither_streamlit_nor_torch() -> None:
    check = "import sys, app.labels; print(sorted({'streamlit', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"
