"""Drive the Streamlit app in headless Chromium: serve it, find its pages, time and wait for reruns.

Used by the browser tests (`tests/browser`, `make test-browser`) and by
`python -m precompute bench --only app`. Playwright is optional (`requirements-browser.txt`); the
browser is the system's Chromium (`apt-get install chromium`, or `$CHROMIUM` names another binary),
never Playwright's own download.

How a rerun is seen: the app root carries `data-test-script-state` (`running` while the script
runs, `notRunning` once it finished). A script injected before the page loads records every change
of that attribute with `performance.now()`, the time of the second animation frame after each
finish (the new elements painted), and the time of every pointer or key press. A rerun caused by an
action is the first finish after the action's last input; its duration is measured from that input,
so Playwright's own overhead (locating, scrolling) is not counted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Self
from urllib.parse import urljoin, urlparse

from engine.data.paths import REPO_ROOT
from engine.errors import ExplorerError

# playwright is an optional dependency (requirements-browser.txt), absent where pyright may run: hence the
# reportMissingImports ignores on its imports.
if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page  # pyright: ignore[reportMissingImports]

logger = logging.getLogger(__name__)

DEFAULT_CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ENV = "CHROMIUM"
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
INSTALL_PLAYWRIGHT = "run `make test-browser` once, or `.venv/bin/pip install -r requirements-browser.txt`."
INSTALL_CHROMIUM = ("install Debian's Chromium with `sudo apt-get install chromium` (Playwright's own browser "
                    f"download is not used), or set ${CHROMIUM_ENV} to a Chromium binary.")
NAV_LINKS = 'a[data-testid="stSidebarNavLink"], a[data-testid="stTopNavLink"]'
ERROR_BOXES = '[data-testid="stException"], [data-testid="stAlertContentError"]'
FINISHED_STATES = ("notRunning", "compilationError")
VIEWPORT = {"width": 1400, "height": 1000}
MAX_SCREENSHOT_HEIGHT = 16000
TABLE_ROW_PX, TABLE_MARKER_X = 35, 12  # Streamlit data frame: row height and the row-marker column's middle

PROBE_JS = """
(() => {
  if (window.__stProbe) return;
  const probe = window.__stProbe = {runs: [], inputs: [], dom: []};
  new MutationObserver(mutations => {
    for (const m of mutations) {
      const entry = {t: performance.now(), state: m.target.getAttribute('data-test-script-state'),
                     old: m.oldValue, painted: null};
      probe.runs.push(entry);
      requestAnimationFrame(() => requestAnimationFrame(() => { entry.painted = performance.now(); }));
    }
  }).observe(document, {subtree: true, attributes: true, attributeOldValue: true,
                        attributeFilter: ['data-test-script-state']});
  // A rerun shorter than a frame may never change the state attribute: its changes to the page still show.
  new MutationObserver(mutations => {
    const inMain = node => (node.nodeType === 1 ? node : node.parentElement)?.closest('[data-testid="stMain"]');
    if (!mutations.some(m => inMain(m.target))) return;
    const entry = {t: performance.now(), painted: null};
    probe.dom.push(entry);
    requestAnimationFrame(() => requestAnimationFrame(() => { entry.painted = performance.now(); }));
  }).observe(document, {subtree: true, childList: true, characterData: true});
  for (const type of ['pointerdown', 'keydown']) {
    document.addEventListener(type, () => probe.inputs.push(performance.now()), true);
  }
})();
"""
# A run finished after `since` (ms) and its elements are painted; returns that run's index.
FINISHED_JS = """
([since, states, quietMs]) => {
  const probe = window.__stProbe;
  if (!probe) return null;
  const i = probe.runs.findIndex(r => r.t >= since && states.includes(r.state) && r.painted !== null);
  if (i >= 0) return i;
  if (probe.runs.some(r => r.t >= since)) return null;  // a run started: wait for it to finish
  // Changes before the action's last input (a filled field's own hint, say) are not the rerun's.
  const start = Math.max(since, ...probe.inputs.filter(t => t >= since));
  const changed = probe.dom.filter(d => d.t >= start && d.painted !== null);
  if (!changed.length || performance.now() - changed[changed.length - 1].t < quietMs) return null;
  // The page changed and then stayed quiet without the state ever leaving notRunning: a sub-frame rerun.
  const last = changed[changed.length - 1];
  probe.runs.push({t: last.t, state: states[0], old: states[0], painted: last.painted});
  return probe.runs.length - 1;
}
"""
# No page change for this long after a change, and no run seen: the rerun is over. Timings use the change
# itself, so a longer wait costs no accuracy; it only guards against a slow server starting the run late.
FAST_RUN_QUIET_MS = 1500
IDLE_JS = """
([states, quietMs]) => {
  const app = document.querySelector('[data-testid="stApp"]');
  const probe = window.__stProbe;
  if (!app || !probe || !states.includes(app.getAttribute('data-test-script-state'))) return false;
  const last = probe.runs.length ? probe.runs[probe.runs.length - 1].t : 0;
  return performance.now() - last >= quietMs && !document.querySelector('[data-stale="true"]');
}
"""
# Lazily loaded elements (charts, metrics, buttons) show a skeleton until their code has arrived.
ELEMENTS_DRAWN_JS = """
() => !document.querySelector('[data-testid="stSkeleton"]')
  && Array.from(document.querySelectorAll('[data-testid="stVegaLiteChart"]')).every(chart => chart.querySelector('canvas, svg'))
"""


# --- pure helpers ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class NavPage:
    """A page of the app's navigation: its title as shown and its URL path ("" for the default page)."""

    title: str
    path: str


def nav_title(text: str) -> str:
    """A nav link's text is its Material icon's ligature name, then the title: keep the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parse_nav_links(links: Sequence[dict[str, str | None]], base_url: str) -> list[NavPage]:
    """The app's own pages from the nav links' text, href and target, in order, without duplicates.

    External links (`st.Page("https://...")`, opened in a new tab, or another host) are skipped.
    """
    base = urlparse(base_url if base_url.endswith("/") else base_url + "/")
    pages: list[NavPage] = []
    for link in links:
        href = link.get("href")
        if not href or link.get("target") == "_blank":
            continue
        url = urlparse(urljoin(base.geturl(), href))
        if url.netloc != base.netloc or not url.path.startswith(base.path):
            continue
        page = NavPage(nav_title(link.get("text") or ""), url.path[len(base.path):].strip("/"))
        if page.path not in {p.path for p in pages}:
            pages.append(page)
    return pages


@dataclass(frozen=True)
class Timing:
    """Seconds measured for one page or interaction against its target."""

    name: str
    seconds: tuple[float, ...]
    target: float
    cold: float | None = None
    extra: tuple[float, ...] = ()  # a second measure: reloading the URL (pages), the script alone (interactions)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def extra_median(self) -> float | None:
        return statistics.median(self.extra) if self.extra else None

    @property
    def passed(self) -> bool:
        return bool(self.seconds) and self.median <= self.target

    @property
    def cold_passed(self) -> bool | None:
        return None if self.cold is None else self.cold <= self.target


def verdict(passed: bool | None) -> str:
    return "—" if passed is None else "PASS" if passed else "FAIL"


class RunTiming(NamedTuple):
    """One rerun caused by an action: seconds from the action's input to the rerun painted, and of those the
    seconds the script ran (as the browser saw it: from `running` to finished)."""

    seconds: float
    script: float


def interaction_seconds(runs: Sequence[dict[str, Any]], inputs: Sequence[float], since: float) -> RunTiming | None:
    """The first rerun finished after `since` (ms), timed from the last input at or after `since` that came before
    it started (without an input event, from `since`) to it painted; None while no rerun has finished."""
    finished = next((run for run in runs if run["t"] >= since and run["state"] in FINISHED_STATES
                     and run.get("painted") is not None), None)
    if finished is None:
        return None
    started = [run["t"] for run in runs if since <= run["t"] <= finished["t"] and run["state"] == "running"]
    began = started[0] if started else finished["t"]
    clicked = [t for t in inputs if since <= t <= began]
    return RunTiming((finished["painted"] - (clicked[-1] if clicked else since)) / 1000,
                     (finished["t"] - began) / 1000)


# --- the system's browser and the app server -------------------------------------------------------

def chromium_path() -> Path:
    """The Chromium binary: $CHROMIUM, else /usr/bin/chromium; a clear error when it is missing."""
    path = Path(os.environ.get(CHROMIUM_ENV) or DEFAULT_CHROMIUM)
    resolved = path if path.is_file() else shutil.which(str(path))
    if not resolved or not os.access(resolved, os.X_OK):
        raise ExplorerError(f"No Chromium at {path}: the browser tests and the app benchmark drive the system's "
                            "Chromium.", INSTALL_CHROMIUM)
    return Path(resolved)


def require_playwright() -> None:
    try:
        import playwright.sync_api  # noqa: F401  # pyright: ignore[reportMissingImports]
    except ImportError as exc:
        raise ExplorerError("Playwright is not installed in this environment.", INSTALL_PLAYWRIGHT) from exc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def serve_app(store: Path, *, data_dir: Path | None = None, port: int | None = None, timeout: float = 90.0,
              log_path: Path | None = None) -> Iterator[str]:
    """Run `python -m app -- --store STORE` (streamlit run) on 127.0.0.1 until the block ends; yields its URL.

    `data_dir` becomes $REFUSAL_EXPLORER_DATA of the server (where the study's models and caches are).
    The server's output goes to `log_path` (a temporary file by default) and its tail is in the error when
    it does not come up.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if data_dir is not None:
        env["REFUSAL_EXPLORER_DATA"] = str(data_dir)
    command = [sys.executable, "-m", "app", "--server.headless", "true",
               "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--", "--store", str(store)]
    log_file = (open(log_path, "w+b") if log_path else tempfile.TemporaryFile())  # noqa: SIM115
    logger.info("Starting the app on %s (store %s)", url, store)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                log_file.seek(0)
                tail = log_file.read().decode(errors="replace")[-3000:]
                state = f"exited with code {process.returncode}" if process.poll() is not None else \
                    f"was not healthy after {timeout:.0f} s"
                raise ExplorerError(f"The app server {state}. Its output:\n{tail}",
                                    "run `make app` to see the error directly.")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()
        logger.info("Stopped the app on %s", url)


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Headless system Chromium through Playwright."""
    require_playwright()
    executable = chromium_path()
    from playwright.sync_api import sync_playwright  # pyright: ignore[reportMissingImports]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


# --- one browser tab on the app -------------------------------------------------------------------------

class AppTab:
    """A browser tab on the app that knows when Streamlit has finished a run."""

    def __init__(self, browser: Browser, base_url: str, *, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_ms = timeout * 1000
        self.context = browser.new_context(viewport=dict(VIEWPORT))
        self.context.add_init_script(PROBE_JS)
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(30_000)

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str = "") -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def now(self) -> float:
        return float(self.page.evaluate("performance.now()"))

    def _wait_finished(self, since: float, what: str) -> int:
        try:
            handle = self.page.wait_for_function(FINISHED_JS, arg=[since, list(FINISHED_STATES), FAST_RUN_QUIET_MS],
                                                 timeout=self.timeout_ms, polling=25)
        except Exception as exc:
            raise AssertionError(f"Streamlit did not finish a run after {what} within "
                                 f"{self.timeout_ms / 1000:.0f} s ({self.page.url}).") from exc
        return int(handle.json_value())

    def wait_idle(self, quiet_ms: int = 300) -> None:
        """No run in progress, none started for `quiet_ms`, and no stale elements left."""
        self.page.wait_for_function(IDLE_JS, arg=[list(FINISHED_STATES), quiet_ms], timeout=self.timeout_ms,
                                    polling=50)

    def open(self, path: str = "") -> float:
        """Load a page in a new session; seconds from the start of navigation to its first run painted."""
        self.page.goto(self.url(path))
        index = self._wait_finished(0.0, f"loading /{path}")
        painted = self.page.evaluate(f"window.__stProbe.runs[{index}].painted")
        self.wait_idle()
        return float(painted) / 1000

    def act(self, action: Callable[[], object], what: str = "the action") -> RunTiming:
        """Do something that makes the app rerun; seconds from its last input event to the rerun painted."""
        since = self.now()
        action()
        self._wait_finished(since, what)
        probe = self.page.evaluate("window.__stProbe")
        timing = interaction_seconds(probe["runs"], probe["inputs"], since)
        self.wait_idle()
        assert timing is not None
        return timing

    # --- what is on the page ---

    def nav_pages(self) -> list[NavPage]:
        """The pages linked from the rendered navigation (sidebar, or top bar), "View more" expanded."""
        more = self.page.locator('[data-testid="stSidebarNavViewButton"]')
        if more.count() and "more" in more.inner_text().lower():
            more.click()
        links = self.page.eval_on_selector_all(
            NAV_LINKS, "links => links.map(a => ({text: a.innerText, href: a.getAttribute('href'), "
                       "target: a.getAttribute('target')}))")
        return parse_nav_links(links, self.base_url)

    def nav_link(self, page: NavPage) -> Locator:
        return self.page.locator(NAV_LINKS).filter(has_text=page.title).first

    def errors(self) -> list[str]:
        """Texts of exception and error boxes on the page."""
        return [text.strip()[:1500] for text in self.page.locator(ERROR_BOXES).all_inner_texts()]

    def main_text(self) -> str:
        return self.page.locator('[data-testid="stMain"]').inner_text()

    def screenshot(self, path: Path) -> Path:
        """The whole page: the viewport is stretched to the main area's scroll height (Streamlit scrolls inside
        it, so Playwright's full_page alone would cut it off)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):  # an element still drawing must not fail the screenshot
            self.page.wait_for_function(ELEMENTS_DRAWN_JS, timeout=10_000, polling=100)
        height = int(self.page.evaluate(
            "() => { const m = document.querySelector('[data-testid=\"stMain\"]');"
            " return m ? m.scrollHeight : document.documentElement.scrollHeight; }"))
        viewport = self.page.viewport_size or dict(VIEWPORT)
        self.page.set_viewport_size({"width": viewport["width"],
                                     "height": min(max(height, viewport["height"]), MAX_SCREENSHOT_HEIGHT)})
        try:
            self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            self.page.screenshot(path=str(path), full_page=True)
        finally:
            self.page.set_viewport_size(viewport)
        return path

    # --- widgets, found by their label ---

    def widget(self, testid: str, label: str | re.Pattern[str]) -> Locator:
        """The widget of this kind (its data-testid, e.g. stSelectbox) whose label is exactly `label` (or
        matches the pattern)."""
        label_box = self.page.locator('[data-testid="stWidgetLabel"]').filter(
            has=self.page.get_by_text(label, exact=True))
        return self.page.locator(f'[data-testid="{testid}"]').filter(has=label_box)

    def selectbox(self, label: str) -> Locator:
        """The selectbox labelled `label` (its combobox's accessible name)."""
        return self.page.locator('[data-testid="stSelectbox"]').filter(
            has=self.page.get_by_role("combobox", name=label, exact=True)).first

    def selectbox_value(self, label: str) -> str:
        return self.selectbox(label).get_by_role("combobox").input_value().strip()

    def pick(self, label: str, option: str | None = None) -> str:
        """Choose `option` in the selectbox labelled `label`, or the first option shown that is not the current
        one; returns the option chosen. The list opens by the selectbox's toggle button (clicking the input
        opens it only when it was not focused already, e.g. not right after a pick)."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout  # pyright: ignore[reportMissingImports]

        current = self.selectbox_value(label)
        options = self.page.get_by_role("option")
        failed = 0
        # A rerun (another widget committing on blur, or a late one) may close the list at any moment:
        # as soon as it opens, or between reading it and the click. Then wait for quiet and reopen it.
        while True:
            self.selectbox(label).locator('button[aria-haspopup="listbox"]').click()
            try:
                options.first.wait_for(timeout=3000)
                if option is None:
                    others: list[str] = [text for text in (t.strip() for t in options.all_inner_texts())
                                         if text != current]
                    if not others:
                        self.page.keyboard.press("Escape")
                        raise AssertionError(f"The selectbox {label!r} offers nothing but {current!r}.")
                    option = others[0]
                options.filter(has_text=re.compile(rf"^\s*{re.escape(option)}\s*$")).first.click(timeout=5000)
                return option
            except PlaywrightTimeout:
                failed += 1
                if failed == 3:
                    raise
                self.wait_idle()

    def choose_radio(self, label: str, option: str) -> None:
        self.widget("stRadio", label).first.get_by_text(option, exact=True).click()

    def press_slider(self, label: str, key: str) -> None:
        thumb = self.widget("stSlider", label).first.get_by_role("slider").first
        thumb.focus()
        thumb.press(key)

    def open_tab(self, label: str) -> None:
        """Open the tab labelled `label` (a page's views are tabs drawn only when open) and wait for its rerun."""
        self.act(lambda: self.page.get_by_role("tab", name=label, exact=True).click(), f"opening the {label} tab")

    def select_table_row(self, index: int = 0, table: int = 0) -> None:
        """Select row `index` of the `table`-th data frame on the page by its row marker (the grid is a canvas:
        the marker column is at its left edge, the rows below the header, each `TABLE_ROW_PX` high)."""
        grid = self.page.locator('[data-testid="stDataFrame"]').nth(table)
        grid.scroll_into_view_if_needed()
        grid.hover(position={"x": TABLE_MARKER_X, "y": TABLE_ROW_PX * (index + 1.5)})
        grid.click(position={"x": TABLE_MARKER_X, "y": TABLE_ROW_PX * (index + 1.5)})

    def slider_value(self, label: str) -> str:
        return self.widget("stSlider", label).first.locator('[data-testid="stSliderThumbValue"]').first.inner_text()
