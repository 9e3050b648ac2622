"""The pure parts of the browser driver and the app benchmark (no browser, no server)."""

from __future__ import annotations

import logging
import math

import pytest

from engine.errors import ExplorerError
from precompute import browser
from precompute.__main__ import build_parser
from precompute.bench_app import interaction_rows, page_rows
from precompute.browser import NavPage, Timing, interaction_seconds, nav_title, parse_nav_links

BASE = "http://127.0.0.1:8501"


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
        browser.chromium_path()
    binary = tmp_path / "chromium"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("CHROMIUM", str(binary))
    assert browser.chromium_path() == binary


def test_bench_only_app_is_an_option_and_needs_a_store(tmp_path, caplog) -> None:
    from precompute.__main__ import main

    args = build_parser().parse_args(["bench", "--only", "app", "--repeats", "2"])
    assert (args.only, args.repeats) == ("app", 2)
    config = tmp_path / "c.yaml"
    config.write_text("study: x\nmodels: {base: m}\n")
    with caplog.at_level(logging.ERROR, logger="precompute"):
        assert main(["bench", "--only", "app", "--config", str(config), "--store", str(tmp_path / "no.duckdb")]) == 2
    assert "No study store at" in caplog.text
