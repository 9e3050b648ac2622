"""The build's progress record: a small JSON file beside the store (`<store stem>.progress.json`) that
`run_pipeline` rewrites atomically as it goes, and the app reads to show which stage is running, how far
it is, how long is left, or the error a stage failed with and the command that resumes the build.

While a stage runs, a thread copies the open tqdm bars into the record every second: the stages report
progress the way they already do, and nobody scrapes a log. The record also keeps each stage's last full
run time on this machine across builds (`python -m precompute bench --only stages` prints them).

This module is read by the app: it imports neither torch nor the pipeline.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine.errors import ExplorerError

RUNNING, FINISHED, FAILED, STOPPED = "running", "finished", "failed", "stopped"
INTERVAL = 1.0  # seconds between two copies of the open bars into the record


def record_path(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(f"{store.stem}.progress.json")


def _write_atomically(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(partial, path)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def open_bars() -> list[dict[str, Any]]:
    """This process's open tqdm bars, outermost (oldest) first."""
    with tqdm.get_lock():
        # tqdm's registry of open bars, which its stubs leave out.
        instances = tqdm._instances  # pyright: ignore[reportAttributeAccessIssue]
        bars = sorted((bar for bar in instances if hasattr(bar, "start_t")), key=lambda bar: bar.start_t)
    now = time.time()
    return [{"desc": bar.desc, "n": bar.n, "total": bar.total, "unit": bar.unit, "elapsed": now - bar.start_t}
            for bar in bars]


class ProgressRecorder:
    """Keeps the record of one build: which planned stage runs, what its bars say, how it ended."""

    def __init__(self, path: Path, planned: list[str], *, command: str, conditions: Mapping[str, Any]) -> None:
        previous = _load(path) or {}
        self.path = path
        self.conditions = dict(conditions)
        self._lock = threading.RLock()  # the bar-copying thread writes too
        self._record: dict[str, Any] = {
            "state": RUNNING, "pid": os.getpid(), "command": command, "started_at": time.time(),
            "stages": [{"name": name, "status": "pending", "seconds": None} for name in planned],
            "current": None, "error": "", "timings": previous.get("timings", {}),
        }

    def _stage(self, name: str) -> dict[str, Any] | None:
        return next((stage for stage in self._record["stages"] if stage["name"] == name), None)

    def write(self) -> None:
        with self._lock:
            current = self._record["current"]
            if current is not None and self._record["state"] == RUNNING:
                current["bars"] = open_bars()
            _write_atomically(self.path, {**self._record, "updated_at": time.time()})

    def start(self, name: str) -> None:
        """Stage `name` starts (or is checked for changes); stages the config does not plan are ignored."""
        with self._lock:
            if (stage := self._stage(name)) is not None:
                stage["status"] = RUNNING
                self._record["current"] = {"stage": name, "started_at": time.time(), "bars": []}
                self.write()

    def finish(self, name: str, status: str, seconds: float) -> None:
        """Stage `name` ended with the pipeline's `status` ("ran", "skipped", ...)."""
        with self._lock:
            if (stage := self._stage(name)) is not None:
                stage.update(status=status, seconds=round(seconds, 1))
                if status == "ran":
                    self._record["timings"][name] = {"seconds": round(seconds, 1), "finished_at": time.time(),
                                                     **self.conditions}
                self._record["current"] = None
                self.write()

    def end(self, state: str, error: str = "") -> None:
        """The build ended: finished, or failed / stopped in the current stage (kept, to say where)."""
        with self._lock:
            if (current := self._record["current"]) is not None:
                stage = self._stage(current["stage"])
                assert stage is not None  # start() sets current only for a planned stage
                stage["status"] = state
            self._record.update(state=state, error=error)
            self.write()


def build_conditions(dtype: str) -> dict[str, Any]:
    """What a stage's time on this machine depends on, kept beside each time in the record."""
    import torch  # here, not at the top: the app imports this module without the model stack

    from engine.runtime.models import describe_machine

    machine = describe_machine()
    return {"dtype": dtype, "device": machine.device, "threads": torch.get_num_threads(), "niceness": os.nice(0),
            "machine": machine.kind, "cpu": machine.processor, "features": machine.features}


@contextmanager
def recording(store: str | Path, planned: list[str], *, command: str, conditions: Mapping[str, Any]
              ) -> Iterator[ProgressRecorder]:
    """Record a build into the store's progress record: bars copied every `INTERVAL` seconds while the
    block runs; at its end the state is finished, failed (with the error) or stopped (interrupted)."""
    recorder = ProgressRecorder(record_path(store), planned, command=command, conditions=conditions)
    recorder.write()
    done = threading.Event()

    def copy_bars() -> None:
        while not done.wait(INTERVAL):
            recorder.write()

    thread = threading.Thread(target=copy_bars, name="progress-record", daemon=True)
    thread.start()
    try:
        yield recorder
    except KeyboardInterrupt:
        recorder.end(STOPPED, "Interrupted.")
        raise
    except Exception as exc:
        recorder.end(FAILED, str(exc) if isinstance(exc, ExplorerError) else f"{type(exc).__name__}: {exc}")
        raise
    else:
        recorder.end(FINISHED)
    finally:
        done.set()
        thread.join()


# Reading the record (the app, the demo launcher, the bench).

@dataclass(frozen=True)
class Bar:
    desc: str
    n: float
    total: float | None
    unit: str
    elapsed: float

    @property
    def fraction(self) -> float | None:
        return min(self.n / self.total, 1.0) if self.total else None

    @property
    def remaining(self) -> float | None:
        """Seconds left at the pace so far (None before the first step or without a total)."""
        return self.elapsed * (self.total - self.n) / self.n if self.total and self.n > 0 else None


@dataclass(frozen=True)
class StageState:
    name: str
    status: str  # pending, running, ran, skipped, failed, ...
    seconds: float | None


@dataclass(frozen=True)
class BuildProgress:
    """A build as its record says, with a `running` build whose process is gone read as stopped."""

    state: str
    stages: tuple[StageState, ...]
    current: str | None
    stage_elapsed: float
    bars: tuple[Bar, ...]  # outermost first
    error: str
    command: str
    timings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    @property
    def position(self) -> tuple[int, int]:
        """(1-based index of the current stage, number of planned stages)."""
        names = [stage.name for stage in self.stages]
        return (names.index(self.current) + 1 if self.current in names else 0), len(names)

    @property
    def step(self) -> Bar | None:
        """The outermost open bar with a known length: the step whose pace says how long is left."""
        return next((bar for bar in self.bars if bar.total), None)

    @property
    def last_seconds(self) -> float | None:
        """How long the current stage took the last time it ran to the end on this machine."""
        timing = self.timings.get(self.current or "")
        return float(timing["seconds"]) if timing else None

    def pending(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages if stage.status in ("pending", RUNNING))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def read_progress(store: str | Path) -> BuildProgress | None:
    """The store's build record, or None if no build has written one."""
    record = _load(record_path(store))
    if record is None:
        return None
    state, error = record["state"], record["error"]
    if state == RUNNING and not _alive(int(record["pid"])):
        state, error = STOPPED, "The build process ended before the build did (killed or crashed)."
    current = record["current"]
    bars = tuple(Bar(str(bar["desc"] or ""), float(bar["n"]), bar["total"], str(bar["unit"]), float(bar["elapsed"]))
                 for bar in (current or {}).get("bars", []))
    return BuildProgress(
        state=state, stages=tuple(StageState(s["name"], s["status"], s["seconds"]) for s in record["stages"]),
        current=current["stage"] if current else None,
        stage_elapsed=time.time() - current["started_at"] if current else 0.0,
        bars=bars, error=error, command=record["command"], timings=record.get("timings", {}),
    )
