"""`make demo`'s launcher (precompute.demo) on a tiny study: the app serves while the study builds beside it at
low priority; a build killed mid-stage is resumed by the next launch; Ctrl-C stops the app and the build."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

from precompute import demo, progress
from tests.conftest import tiny_study_settings

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as response:
            return response.read() == b"ok"
    except OSError:
        return False


def _wait_for(check: Callable[[], T], what: str, log: Path, timeout: float = 300.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; build log:\n"
                         + (log.read_text()[-3000:] if log.is_file() else "(none)"))


def _launch(config: Path, store: Path, port: int) -> subprocess.Popen:
    """The launcher with SIGINT ignored, as a background job of a non-interactive shell or a CI runner
    starts it: Ctrl-C (SIGINT) must stop it all the same."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # an ignored signal stays ignored across exec
    try:
        return subprocess.Popen([sys.executable, "-m", "precompute.demo", "--config", str(config), "--store",
                                 str(store), "--", "--server.port", str(port), "--server.address", "localhost",
                                 "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                                cwd=Path(__file__).resolve().parents[1])
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c(launcher: subprocess.Popen, port: int) -> None:
    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(90) == 130
    assert not _serving(port)


def test_a_build_killed_mid_stage_resumes_on_the_next_launch(tmp_path: Path, tiny_model_dir: Path) -> None:
    store = tmp_path / "stores" / "tiny.duckdb"
    settings = tiny_study_settings(store, tiny_model_dir)
    for later in ("saes", "steering", "circuits"):  # three stages are enough to stop in the middle of one
        del settings[later]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(settings))
    log, port = demo.build_log(store), _free_port()

    launcher = _launch(config, store, port)
    try:
        _wait_for(lambda: _serving(port), "the app", log)
        _wait_for(lambda: (build := progress.read_progress(store)) and build.current == "directions",
                  "the directions stage", log)
        record = json.loads(progress.record_path(store).read_text())
        assert os.getpriority(os.PRIO_PROCESS, record["pid"]) == demo.BUILD_NICENESS
        os.killpg(record["pid"], signal.SIGKILL)
        stopped = _wait_for(lambda: (build := progress.read_progress(store)).state == progress.STOPPED and build,
                            "the killed build to read as stopped", log)
        assert stopped.current == "directions" and "ended before the build did" in stopped.error
        assert _serving(port)  # the app outlives its build
        _ctrl_c(launcher, port)

        launcher = _launch(config, store, port)
        built = _wait_for(lambda: (build := progress.read_progress(store)).state == progress.FINISHED and build,
                          "the resumed build", log)
        assert {stage.name: stage.status for stage in built.stages} == {
            "prompts": "skipped", "generate": "skipped", "evaluation": "skipped", "directions": "ran", "tradeoff": "ran"}
        timing = built.timings["directions"]
        assert (timing["niceness"], timing["threads"]) == (demo.BUILD_NICENESS, demo.build_threads())
        _wait_for(lambda: _serving(port), "the app", log)
        _ctrl_c(launcher, port)
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(90)


def test_a_running_build_is_not_started_twice(tmp_path: Path, monkeypatch) -> None:
    store = tmp_path / "s.duckdb"
    conditions = {"dtype": "float32"}
    started: list[list[str]] = []
    monkeypatch.setattr(demo, "start_background", lambda command, **_: started.append(command))
    with progress.recording(store, ["prompts"], command="", conditions=conditions):  # this process builds
        assert demo.start_build(Path("c.yaml"), store, threads=1) is None
    assert not started
    demo.start_build(Path("c.yaml"), store, threads=1)  # that build finished: a new one starts
    assert started[0][-5:] == ["run", "--config", "c.yaml", "--store", str(store)]


def test_the_build_leaves_a_core_to_the_app() -> None:
    assert [demo.build_threads(cores) for cores in (1, 2, 8)] == [1, 2, 8]
