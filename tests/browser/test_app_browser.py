"""The app in a real browser (`make test-browser`): every page of the navigation renders without an error box,
with a full-page screenshot in screenshots/browser/, and the main interactions work.

The study is built here from the tiny in-process model with every stage, unless $BROWSER_STORE names a built
store (e.g. data/stores/demo.duckdb). The app runs as `python -m app` (streamlit run) in a subprocess and is driven by the
system's Chromium through Playwright (tools/browser/driver.py).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.labels import ALL_FEATURES, CATEGORY_CIRCUIT, FEATURE_DASHBOARD
from engine.data import store as study_store
from engine.data.paths import REPO_ROOT
from engine.errors import ExplorerError
from tools.browser import driver

pytestmark = pytest.mark.browser
logger = logging.getLogger(__name__)

SCREENSHOTS = REPO_ROOT / "screenshots" / "browser"
STORE_ENV = "BROWSER_STORE"
CATEGORIES = ["deception", "hate", "violence"]  # three categories keep the study small and still comparable
# The data dir outside the tests (the autouse fixture isolated_data_dir points each test elsewhere).
OUTER_DATA = Path(os.environ.get("REFUSAL_EXPLORER_DATA") or REPO_ROOT / "data")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "page"


@pytest.fixture(scope="session")
def chromium_browser() -> Iterator[object]:
    problem = None
    try:
        driver.chromium_path()
        driver.require_playwright()
    except ExplorerError as exc:
        problem = str(exc)
    if problem:  # one message for the whole run, not one per test
        pytest.exit(f"The browser tests cannot run. {problem}", returncode=1)
    with driver.chromium() as browser:
        yield browser


@pytest.fixture(scope="session")
def study(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """(store, data dir): $BROWSER_STORE, or a tiny study with every stage built in a temporary data dir."""
    if os.environ.get(STORE_ENV):
        store = Path(os.environ[STORE_ENV]).resolve()
        if not store.is_file():
            pytest.fail(f"${STORE_ENV} = {store} is not a study store. Fix: build it with `make study` or unset "
                        f"${STORE_ENV} to test on a tiny study.", pytrace=False)
        return store, store.parent.parent if store.parent.name == "stores" else OUTER_DATA

    from conftest import tiny_study_settings

    from precompute import pipeline
    from precompute.config import parse_config
    from precompute.stages import STAGES

    data = tmp_path_factory.mktemp("browser") / "data"
    store = data / "stores" / "tiny.duckdb"
    settings = tiny_study_settings(store, tiny_model_dir)
    settings["prompts"] = {"test_fraction": 0.1, "categories": CATEGORIES}
    settings["circuits"].update(max_nodes=12, stored_nodes=30)
    config = parse_config(settings)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("REFUSAL_EXPLORER_DATA", str(data))
        reports = pipeline.run_pipeline(config, STAGES)
    logger.info("tiny study: %s", ", ".join(f"{r.stage} {r.seconds:.0f} s" for r in reports))
    return store, data


@pytest.fixture(scope="session")
def app_url(study: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store, data = study
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    try:
        with driver.serve_app(store, data_dir=data, log_path=log) as url:
            yield url
    except ExplorerError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def nav_pages(chromium_browser, app_url: str) -> list[driver.NavPage]:
    with driver.AppTab(chromium_browser, app_url) as tab:
        tab.open("")
        pages = tab.nav_pages()
        assert pages, f"The app shows no navigation links; error boxes: {tab.errors() or 'none'}"
    logger.info("pages in the navigation: %s", ", ".join(page.title for page in pages))
    return pages


@pytest.fixture
def tab(chromium_browser, app_url: str) -> Iterator[driver.AppTab]:
    with driver.AppTab(chromium_browser, app_url) as tab:
        yield tab


def _page(pages: list[driver.NavPage], title: str) -> driver.NavPage:
    found = [page for page in pages if page.title == title]
    assert found, f"No page {title!r} in the navigation ({[page.title for page in pages]})"
    return found[0]


def _no_errors(tab: driver.AppTab, where: str) -> None:
    errors = tab.errors()
    if errors:
        tab.screenshot(SCREENSHOTS / f"error-{_slug(where)}.png")
    assert not errors, f"{where} shows an error box:\n" + "\n---\n".join(errors)


def test_every_page_in_the_navigation_renders_without_errors(tab: driver.AppTab, nav_pages) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for old in SCREENSHOTS.glob("*.png"):
        old.unlink()
    failures = {}
    for number, page in enumerate(nav_pages, 1):
        seconds = tab.open(page.path)
        shot = tab.screenshot(SCREENSHOTS / f"{number:02d}-{_slug(page.title)}.png")
        logger.info("%-16s rendered in %.2f s -> %s", page.title, seconds, shot.name)
        assert tab.main_text().strip(), f"{page.title} rendered nothing"
        if errors := tab.errors():
            failures[page.title] = errors
    assert not failures, "Pages with an error box (screenshots in screenshots/browser/):\n" + "\n".join(
        f"- {title}: {errors[0][:600]}" for title, errors in failures.items())


@pytest.mark.parametrize(("title", "section"), [("Directions", None), ("Circuits", CATEGORY_CIRCUIT)])
def test_picking_a_category(tab: driver.AppTab, nav_pages, title: str, section: str | None) -> None:
    tab.open(_page(nav_pages, title).path)
    if section:
        tab.open_tab(section)
    before_value, before_text = tab.selectbox_value("Category"), tab.main_text()
    picked = []
    tab.act(lambda: picked.append(tab.pick("Category")), f"picking another category on {title}")
    other = picked[0]
    assert other != before_value and tab.selectbox_value("Category") == other
    assert tab.main_text() != before_text
    _no_errors(tab, f"{title} after picking {other}")
    tab.screenshot(SCREENSHOTS / f"interaction-{_slug(title)}-category.png")


def test_feature_dashboard_from_query_parameters(tab: driver.AppTab, nav_pages, study) -> None:
    store, _ = study
    features = _page(nav_pages, "Features")
    hook = study_store.read_table(store, "saes").sort_values("layer")["hook"].iloc[0]  # not the default SAE
    examples = study_store.read_table(store, "feature_examples").query("hook == @hook")
    feature = int(examples["feature"].iloc[0])
    tab.open(f"{features.path}?hook={hook}&feature={feature}")
    _no_errors(tab, "Features from query parameters")
    assert tab.selectbox_value("SAE") == hook
    heading = tab.page.get_by_role("heading", name=f"Feature {feature}", exact=True)
    assert heading.is_visible()
    assert tab.page.get_by_text("Top activating texts").is_visible()

    field = tab.widget("stNumberInput", re.compile(r"^Feature \(")).first.locator("input")
    other = feature + 1
    tab.act(lambda: (field.fill(str(other)), field.press("Enter")), "choosing another feature")
    _no_errors(tab, f"Features after choosing feature {other}")
    assert tab.page.get_by_role("heading", name=f"Feature {other}", exact=True).is_visible()
    assert f"feature={other}" in tab.page.url  # the dashboard's address follows the choice
    tab.screenshot(SCREENSHOTS / "interaction-features-dashboard.png")


def test_steering_generates_a_baseline_and_a_steered_answer(tab: driver.AppTab, nav_pages) -> None:
    tab.open(_page(nav_pages, "Steering").path)
    assert tab.page.get_by_text("Baseline", exact=True).count() == 0
    tab.act(lambda: tab.page.get_by_role("button", name="Generate", exact=True).click(), "generating")
    _no_errors(tab, "Steering after Generate")
    for title in ("Baseline", "Steered"):
        assert tab.page.get_by_role("heading", name=title, exact=True).is_visible()
    scores = tab.page.locator('[data-testid="stMetric"]').filter(has_text="Refusal score")
    assert scores.count() == 2
    tab.screenshot(SCREENSHOTS / "interaction-steering-generate.png")


def test_features_keep_every_change_of_the_feature(tab: driver.AppTab, nav_pages) -> None:
    tab.open(_page(nav_pages, "Features").path)
    field = tab.widget("stNumberInput", re.compile(r"^Feature \(")).first.locator("input")
    for feature in (1, 2):
        tab.act(lambda feature=feature: (field.fill(str(feature)), field.press("Enter")), f"choosing {feature}")
        assert tab.page.get_by_role("heading", name=f"Feature {feature}", exact=True).is_visible()


def test_a_row_of_the_feature_table_opens_its_dashboard(tab: driver.AppTab, nav_pages) -> None:
    tab.open(_page(nav_pages, "Features").path)
    heading = tab.page.get_by_role("heading", name=re.compile(r"^Feature \d+$"))
    shown = int(heading.inner_text().split()[-1])  # the most refusal-aligned feature, at first
    tab.open_tab(ALL_FEATURES)
    tab.act(lambda: tab.pick("Sort by", "feature id"), "sorting by feature id")
    row = 1 if shown == 0 else 0  # feature `row` is then the table's row `row`, and not the one shown before
    tab.act(lambda: tab.select_table_row(row), f"selecting row {row}")
    _no_errors(tab, "Features after selecting a row")
    assert tab.page.get_by_role("tab", name=FEATURE_DASHBOARD, selected=True).is_visible()
    assert heading.inner_text() == f"Feature {row}"
    tab.screenshot(SCREENSHOTS / "interaction-features-table-row.png")
