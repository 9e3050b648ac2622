"""`python -m precompute.demo`, what `make demo` runs: the app starts at once and the study builds in a
background process beside it. Pages fill in as their stages land; the sidebar shows the build's
progress (precompute.progress). The build runs at the lowest priority (nice 19) on every core: the
app's live steering preempts it whenever it runs (in the same session, so niceness applies between
the two), and the build has the whole CPU the rest of the time (`python -m precompute bench --only
steering-during-build` measures the cost to steering: 1.1-1.2x on 2 cores). Ctrl-C stops both; running it again resumes the build where it
stopped (finished stages, and finished chunks inside a stage, are kept).

    python -m precompute.demo --config precompute/configs/demo.yaml --store data/stores/demo.duckdb \\
        -- --server.port 8501 --server.headless true
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from precompute.progress import read_progress

logger = logging.getLogger("precompute.demo")

BUILD_NICENESS = 19  # the build gets only the CPU the app leaves
STOP_SECONDS = 30.0  # after Ctrl-C, how long a process may take to stop before it is killed
POLL_SECONDS = 1.0


def build_threads(cores: int | None = None) -> int:
    """Compute threads for a build beside the app: every core, since nice 19 yields them to the app."""
    return max(1, cores or os.cpu_count() or 1)


def start_background(command: Sequence[str], *, threads: int, stdout: IO | int | None) -> subprocess.Popen:
    """`command` at the build's priority with `threads` compute threads, in its own process group: Ctrl-C
    in the terminal reaches only this launcher, which stops its processes in order (`stop`)."""
    limits = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")}
    return subprocess.Popen(["nice", "-n", str(BUILD_NICENESS), *command], env={**os.environ, **limits},
                            stdout=stdout, stderr=subprocess.STDOUT, text=True, process_group=0)


def stop(*processes: subprocess.Popen) -> None:
    """Interrupt `processes` as Ctrl-C would (a build records where it stopped), killing any that lingers."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_SECONDS
    for process in running:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            logger.warning("Process %d did not stop within %.0f s: killed.", process.pid, STOP_SECONDS)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def build_log(store: Path) -> Path:
    return store.with_name(f"{store.stem}.build.log")


def start_build(config: Path, store: Path, *, threads: int) -> subprocess.Popen | None:
    """`python -m precompute run` on the study in the background, unless a build of this store is
    running already (None then). Stages the store holds up to date are skipped: on a complete store
    the build ends within seconds, on an incomplete one it resumes."""
    progress = read_progress(store)
    if progress is not None and progress.running:
        logger.info("A build of %s is running already: the app shows its progress.", store)
        return None
    log = build_log(store)
    log.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Building the study in the background (%d threads, low priority; log: %s). The app fills in "
                "as its stages land.", threads, log)
    with open(log, "a", encoding="utf-8") as handle:
        return start_background([sys.executable, "-m", "precompute", "run", "--config", str(config),
                                 "--store", str(store)], threads=threads, stdout=handle)


def report_build_end(process: subprocess.Popen, store: Path) -> None:
    progress = read_progress(store)
    if process.returncode == 0:
        logger.info("The study is built: every page is complete.")
    else:
        logger.error("The build stopped (exit %d)%s. Its log: %s. Run `make demo` again to resume it.",
                     process.returncode, f": {progress.error}" if progress and progress.error else "",
                     build_log(store))


def serve(config: Path, store: Path, streamlit_args: Sequence[str], *, threads: int) -> int:
    """Serve the app on `store` while the study builds; returns when the app stops (Ctrl-C stops both)."""
    build = start_build(config, store, threads=threads)
    app = subprocess.Popen([sys.executable, "-m", "app", *streamlit_args, "--", "--store", str(store)],
                           process_group=0)
    try:
        while app.poll() is None:
            if build is not None and build.poll() is not None:
                report_build_end(build, store)
                build = None
            time.sleep(POLL_SECONDS)
        return app.returncode
    except KeyboardInterrupt:
        logger.info("Stopping the app and the build: finished stages are kept, `make demo` resumes the build.")
        return 130
    finally:
        stop(*(process for process in (build, app) if process is not None))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m precompute.demo",
                                     description=(__doc__ or "").split("\n\n")[0],  # None under python -OO
                                     epilog="Arguments after -- go to Streamlit (e.g. --server.port 8501).")
    parser.add_argument("--config", type=Path, default=Path("precompute/configs/demo.yaml"))
    parser.add_argument("--store", type=Path, default=Path("data/stores/demo.duckdb"))
    parser.add_argument("--build-threads", type=int, default=build_threads(),
                        help=f"compute threads of the background build (default here: {build_threads()})")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops both as Ctrl-C does
    # Ctrl-C too where the launcher inherited SIGINT ignored (a job started in the background by a
    # non-interactive shell or a CI runner): Python then leaves it ignored.
    signal.signal(signal.SIGINT, _interrupt)
    return serve(args.config, args.store, argv[split + 1:], threads=args.build_threads)


if __name__ == "__main__":
    sys.exit(main())
