"""`python -m precompute bench --only app`: page and interaction speed of the app, driven in headless Chromium.

The app is started on the study's store in a subprocess and every page of its navigation (found on the
rendered sidebar, so new pages are covered) is timed:

- cold: the first load of the page after the server started (a new browser session; Streamlit's caches
  empty), from the start of navigation to the first run finished and painted;
- switch: moving to the page by its navigation link from the previous page, as a reader does; the
  median of `repeats` after one warm-up round;
- load: loading the page's URL again in a new session (warm caches), the median of `repeats`.

Interactions (a selectbox, radio or slider change on Directions, Features and Circuits) are timed from
the input event to the rerun painted, the median of `repeats` after one warm-up. Live generation and
encoding are left out. Targets: a page within 2 s (switch, which decides PASS/FAIL), an interaction
within 0.3 s.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.labels import ALL_FEATURES, CATEGORY_CIRCUIT
from engine.errors import ExplorerError
from precompute.config import StudyConfig
from tools.browser.driver import (
    AppTab,
    NavPage,
    RunTiming,
    Timing,
    chromium,
    chromium_path,
    require_playwright,
    serve_app,
    verdict,
)

logger = logging.getLogger(__name__)

PAGE_TARGET = 2.0
INTERACTION_TARGET = 0.3
FIND_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class Interaction:
    """One widget change on a page (in its tab `tab`, if the page draws only the open tab); `act` is called
    once per repeat with the repeat's number (to alternate)."""

    page: str
    name: str
    act: Callable[[AppTab, int], None]
    tab: str | None = None


def _pick_other(label: str) -> Callable[[AppTab, int], None]:
    def act(tab: AppTab, _: int) -> None:
        tab.pick(label)
    return act


def _radio(label: str, first: str, second: str) -> Callable[[AppTab, int], None]:
    return lambda tab, i: tab.choose_radio(label, second if i % 2 == 0 else first)


def _slider(label: str) -> Callable[[AppTab, int], None]:
    return lambda tab, i: tab.press_slider(label, "ArrowLeft" if i % 2 == 0 else "ArrowRight")


def _next_feature(tab: AppTab, i: int) -> None:
    field = tab.widget("stNumberInput", re.compile(r"^Feature \(")).first.locator("input")
    value = int(field.input_value())
    field.fill(str(value + 1 if i % 2 == 0 else value - 1))
    field.press("Enter")


INTERACTIONS = (
    Interaction("Directions", "colour by: radio", _radio("Colour by", "ablation_score", "kl")),
    Interaction("Directions", "projection category: selectbox", _pick_other("Category")),
    Interaction("Features", "sort by: selectbox", _pick_other("Sort by"), tab=ALL_FEATURES),
    Interaction("Features", "feature: number input", _next_feature),
    Interaction("Features", "SAE: selectbox", _pick_other("SAE")),
    Interaction("Circuits", "category: selectbox", _pick_other("Category"), tab=CATEGORY_CIRCUIT),
    Interaction("Circuits", "nodes at most: slider", _slider("Nodes at most"), tab=CATEGORY_CIRCUIT),
    Interaction("Circuits", "similarity: radio", _radio("Similarity", "cosine of node effects", "Jaccard of node sets")),
)


def time_pages(tab: AppTab, pages: list[NavPage], repeats: int) -> dict[str, list[float]]:
    """Seconds to switch to each page by its navigation link: one warm-up round, then `repeats` rounds."""
    switches: dict[str, list[float]] = {page.path: [] for page in pages}
    for round_ in range(repeats + 1):
        for page in pages:
            timing = tab.act(lambda page=page: tab.nav_link(page).click(), f"switching to {page.title}")
            if round_:
                switches[page.path].append(timing.seconds)
        logger.info("switch round %d of %d%s: %s", round_, repeats, " (warm-up)" if not round_ else "",
                    ", ".join(f"{page.title} {switches[page.path][-1]:.2f} s" if round_ else page.title
                              for page in pages))
    return switches


def time_interaction(tab: AppTab, interaction: Interaction, path: str, repeats: int) -> list[RunTiming]:
    """`repeats` timings of the interaction on the page, after one warm-up."""
    tab.open(path)
    if interaction.tab:
        tab.open_tab(interaction.tab)
    timings = []
    for i in range(repeats + 1):
        timing = tab.act(lambda i=i: interaction.act(tab, i), interaction.name)
        if errors := tab.errors():
            raise ExplorerError(f"{interaction.page} showed an error after {interaction.name}: {errors[0]}",
                                "fix the page (see the screenshot with `make test-browser`).")
        if i:  # the first is the warm-up
            timings.append(timing)
    return timings


def bench_app(store: Path, *, repeats: int = 3, data_dir: Path | None = None) -> tuple[list[Timing], list[Timing]]:
    """Start the app on `store`, time every page and the interactions; returns (pages, interactions)."""
    require_playwright()
    chromium_path()
    # An optional dependency (requirements-browser.txt), checked by require_playwright.
    from playwright.sync_api import Error as PlaywrightError  # pyright: ignore[reportMissingImports]

    if not store.is_file():
        raise ExplorerError(f"No study store at {store}.", "build it first: python -m precompute run.")
    page_timings: list[Timing] = []
    interaction_timings: list[Timing] = []
    with serve_app(store, data_dir=data_dir) as url, chromium() as browser:
        cold: dict[str, float] = {}
        loads: dict[str, list[float]] = {}
        with AppTab(browser, url) as tab:
            started = time.perf_counter()
            cold[""] = tab.open("")
            pages = tab.nav_pages()
            if not pages:
                raise ExplorerError(f"The app at {url} shows no navigation links ({tab.errors() or 'no error box'}).",
                                    "open it with `make app` and check app/main.py.")
            logger.info("Pages in the navigation: %s", ", ".join(page.title for page in pages))
        for page in pages:  # the first visit of every page, each in a new session
            if page.path not in cold:
                with AppTab(browser, url) as tab:
                    cold[page.path] = tab.open(page.path)
            logger.info("cold %-12s %6.2f s", page.title, cold[page.path])
        with AppTab(browser, url) as tab:
            tab.open(pages[0].path)
            switches = time_pages(tab, pages, repeats)
            for page in pages:
                loads[page.path] = [tab.open(page.path) for _ in range(repeats)]
        for page in pages:
            page_timings.append(Timing(page.title, tuple(switches[page.path]), PAGE_TARGET, cold=cold[page.path],
                                       extra=tuple(loads[page.path])))
        by_title = {page.title: page for page in pages}
        for interaction in INTERACTIONS:
            name = f"{interaction.page}: {interaction.name}"
            page = by_title.get(interaction.page)
            if page is None:
                logger.warning("%s: no page %r in the navigation; skipped", name, interaction.page)
                continue
            with AppTab(browser, url) as tab:
                tab.page.set_default_timeout(FIND_TIMEOUT_MS)
                try:
                    timings = time_interaction(tab, interaction, page.path, repeats)
                except ExplorerError as exc:
                    logger.warning("%s: %s", name, exc)
                    continue
                except (PlaywrightError, AssertionError) as exc:  # a widget renamed or gone: time the others
                    logger.warning("%s: skipped (%s)", name, str(exc).splitlines()[0])
                    continue
            interaction_timings.append(Timing(name, tuple(t.seconds for t in timings), INTERACTION_TARGET,
                                              extra=tuple(t.script for t in timings)))
            logger.info("%-45s %s s (script %s s)", name, ", ".join(f"{t.seconds:.2f}" for t in timings),
                        ", ".join(f"{t.script:.2f}" for t in timings))
        logger.info("App benchmark took %.0f s", time.perf_counter() - started)
    return page_timings, interaction_timings


def _seconds(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.2f}"


def page_rows(timings: list[Timing]) -> list[tuple[str, ...]]:
    """Table rows: page, cold s, switch median s, load median s, target s, PASS/FAIL (switch median), cold."""
    return [(t.name, _seconds(t.cold), _seconds(t.median), _seconds(t.extra_median), f"{t.target:g}",
             verdict(t.passed), verdict(t.cold_passed)) for t in timings]


def interaction_rows(timings: list[Timing]) -> list[tuple[str, ...]]:
    """Table rows: interaction, median s, max s, the script's median s, target s, PASS/FAIL."""
    return [(t.name, _seconds(t.median), _seconds(max(t.seconds) if t.seconds else None), _seconds(t.extra_median),
             f"{t.target:g}", verdict(t.passed)) for t in timings]


def report_app(pages: list[Timing], interactions: list[Timing], *, repeats: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Pages (median of {repeats} after a warm-up; target {PAGE_TARGET:g} s)")
    for column in ("page", "cold s", "switch s (median)", "load s (median)", "target s", "PASS/FAIL", "cold"):
        table.add_column(column, justify="left" if column == "page" else "right", no_wrap=column == "page")
    for row in page_rows(pages):
        table.add_row(*row)
    actions = Table(title=f"Interactions (input to rerun painted; target {INTERACTION_TARGET:g} s)")
    for column in ("interaction", "median s", "max s", "of which script s", "target s", "PASS/FAIL"):
        actions.add_column(column, justify="left" if column == "interaction" else "right",
                           no_wrap=column == "interaction")
    for row in interaction_rows(interactions):
        actions.add_row(*row)
    console = Console(width=max(shutil.get_terminal_size().columns, 120))
    console.print(table)
    console.print(actions)
    failed = [t.name for t in [*pages, *interactions] if not t.passed]
    logger.info("App speed: %d of %d pages and %d of %d interactions within target%s",
                sum(t.passed for t in pages), len(pages), sum(t.passed for t in interactions), len(interactions),
                f"; over: {', '.join(failed)}" if failed else "")


def run_app_bench(config: StudyConfig, *, repeats: int) -> tuple[list[Timing], list[Timing]]:
    data_dir = config.store.parent.parent if config.store.parent.name == "stores" else None
    pages, interactions = bench_app(config.store, repeats=repeats, data_dir=data_dir)
    report_app(pages, interactions, repeats=repeats)
    return pages, interactions
