"""The build's progress record (precompute.progress) and the app on a store still being built: every page
renders, the build panel shows the running stage, pages waiting for a stage say which and that it runs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from tqdm import tqdm

from engine.data import store
from engine.errors import ExplorerError
from engine.runtime.models import describe_machine
from precompute import demo, pipeline, progress
from precompute.__main__ import main
from precompute.bench import run_bench
from precompute.config import parse_config
from precompute.stages import STAGES
from precompute.stages.prompts import PromptsStage
from tests.conftest import tiny_study_settings

MAIN = Path(__file__).resolve().parents[1] / "app" / "main.py"
CONDITIONS = {"dtype": "float32", "device": "cpu", "threads": 1, "niceness": 19, "machine": "AVX2 CPU",
              "cpu": "test CPU, 2 cores", "features": "AVX2 yes, AVX512-BF16 no, AMX no"}
PLANNED = ["prompts", "generate", "evaluation", "directions", "saes", "steering", "circuits"]


def test_record_shows_the_running_stage_and_its_open_bars(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with progress.recording(path, ["prompts", "generate"], command="build again", conditions=CONDITIONS) as record:
        record.start("prompts")
        record.finish("prompts", "ran", 2.0)
        record.start("generate")
        with tqdm(total=40, desc="generate", unit="prompt") as outer, tqdm(total=8, desc="inner") as inner:
            outer.update(10)
            inner.update(3)
            record.write()
            running = progress.read_progress(path)
        record.finish("generate", "skipped", 0.0)
    assert running.running and running.current == "generate" and running.position == (2, 2)
    assert [(bar.desc, bar.n, bar.total) for bar in running.bars] == [("generate", 10, 40), ("inner", 3, 8)]
    assert running.step.fraction == 0.25
    assert running.step.remaining == pytest.approx(running.step.elapsed * 3)  # 30 to go at 10 so far
    done = progress.read_progress(path)
    assert done.state == progress.FINISHED and done.current is None and done.command == "build again"
    assert [(s.name, s.status, s.seconds) for s in done.stages] == [("prompts", "ran", 2.0), ("generate", "skipped", 0.0)]
    assert done.timings["prompts"] == {**CONDITIONS, "seconds": 2.0, "finished_at": done.timings["prompts"]["finished_at"]}
    assert "generate" not in done.timings  # skipped: no time measured


def test_a_stage_time_is_kept_across_builds_and_is_the_estimate_next_time(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with progress.recording(path, ["saes"], command="", conditions=CONDITIONS) as record:
        record.start("saes")
        record.finish("saes", "ran", 600.0)
    with progress.recording(path, ["saes"], command="", conditions=CONDITIONS) as record:
        record.start("saes")
        assert progress.read_progress(path).last_seconds == 600.0


@pytest.mark.parametrize(("raised", "state", "error"), [
    (ExplorerError("No GPU.", "use the CPU."), progress.FAILED, "No GPU. Fix: use the CPU."),
    (RuntimeError("out of memory"), progress.FAILED, "RuntimeError: out of memory"),
    (KeyboardInterrupt(), progress.STOPPED, "Interrupted."),
])
def test_a_failed_or_interrupted_build_says_where_and_why(tmp_path: Path, raised, state, error) -> None:
    path = tmp_path / "s.duckdb"
    with pytest.raises(type(raised)), progress.recording(path, ["prompts", "saes"], command="resume me",
                                                         conditions=CONDITIONS) as record:
        record.start("prompts")
        record.finish("prompts", "ran", 1.0)
        record.start("saes")
        raise raised
    ended = progress.read_progress(path)
    assert (ended.state, ended.current, ended.error, ended.command) == (state, "saes", error, "resume me")
    assert [s.status for s in ended.stages] == ["ran", state]


def test_a_running_record_whose_process_is_gone_reads_as_stopped(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    with progress.recording(path, ["prompts"], command="", conditions=CONDITIONS) as record:
        record.start("prompts")
        assert progress.read_progress(path).running
        data = json.loads(progress.record_path(path).read_text())
    progress.record_path(path).write_text(json.dumps({**data, "state": "running", "pid": int(gone.stdout)}))
    stale = progress.read_progress(path)
    assert stale.state == progress.STOPPED and "ended before the build did" in stale.error


def test_the_pipeline_records_each_stage_and_a_failure(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    config = parse_config({"study": "p", "store": str(tmp_path / "p.duckdb"), "models": {"base": str(tiny_model_dir)}})
    pipeline.run_pipeline(config, STAGES, until="prompts", command="python -m precompute run --until prompts")
    built = progress.read_progress(config.store)
    assert built.state == progress.FINISHED and built.command == "python -m precompute run --until prompts"
    assert built.stages[0] == progress.StageState("prompts", "ran", built.stages[0].seconds)
    assert {s.status for s in built.stages[1:]} == {"pending"}
    assert built.timings["prompts"]["niceness"] == os.nice(0)

    def broken(self, context):
        raise ExplorerError("The prompt file is empty.", "add prompts.")

    monkeypatch.setattr(PromptsStage, "run", broken)
    with pytest.raises(ExplorerError):
        pipeline.run_pipeline(config, STAGES, force=frozenset({"prompts"}), command="again")
    failed = progress.read_progress(config.store)
    assert (failed.state, failed.current, failed.error) == ("failed", "prompts", "The prompt file is empty. Fix: add prompts.")


def test_bench_prints_each_stage_time_with_the_cpu_features_and_dtype(tmp_path, tiny_model_dir, caplog) -> None:
    config = tmp_path / "study.yaml"
    config.write_text(f"study: p\nmodels: {{base: {tiny_model_dir}}}\n")
    store_path = str(tmp_path / "p.duckdb")
    assert main(["run", "--config", str(config), "--store", store_path, "--until", "prompts"]) == 0
    progress.record_path(Path(store_path)).unlink()
    with caplog.at_level(logging.ERROR, logger="precompute"):
        assert main(["bench", "--only", "stages", "--config", str(config), "--store", store_path]) == 2
    assert "No stage times for" in caplog.text
    assert main(["run", "--config", str(config), "--store", store_path, "--until", "prompts",
                 "--force", "prompts"]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="precompute"):
        assert main(["bench", "--only", "stages", "--config", str(config), "--store", store_path]) == 0
    machine = describe_machine()
    lines = {line.split("  ")[0]: line for line in caplog.messages}
    assert machine.features in lines[f"machine: {machine.kind}"]
    assert "float32 on cpu, " in lines["stage: prompts"] and f"nice {os.nice(0)}" in lines["stage: prompts"]
    assert set(lines) >= {"stage: prompts", "stages: total"} and "stage: generate" not in lines


def test_bench_times_live_steering_idle_and_beside_a_build_like_load(tiny_store, tiny_model_dir, monkeypatch) -> None:
    config = parse_config(tiny_study_settings(tiny_store, tiny_model_dir))
    started = []
    real_start = demo.start_background
    monkeypatch.setattr(demo, "start_background", lambda *a, **k: started.append(real_start(*a, **k)) or started[-1])
    results = {r.name: r for r in run_bench(config, which="steering-during-build", new_tokens=4, repeats=1,
                                            n_prompts=0)}
    assert set(results) == {"steering, no build beside it", "steering, build running beside it",
                            "steering during build / idle"}
    ratio = results["steering during build / idle"].value
    assert ratio == results["steering, build running beside it"].value / results["steering, no build beside it"].value
    assert f"at nice {demo.BUILD_NICENESS}" in results["steering, no build beside it"].detail
    assert started[0].args[:3] == ["nice", "-n", str(demo.BUILD_NICENESS)] and started[0].poll() is not None


def test_bench_times_a_tune_step_with_the_head_shared_and_in_autocast(tmp_path, tiny_model_dir, monkeypatch) -> None:
    import pandas as pd

    from precompute import bench

    path = tmp_path / "t.duckdb"
    data = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(12)], "text": [f"Name a fruit number {i}" for i in range(12)],
                         "kind": "safe", "category": "privacy", "source": "builtin", "response": "An apple", "complete": True})
    store.write_stage(path, run=store.RunRecord(study="tiny", stage="tune", models=("base",), dataset="builtin", config={}),
                      input_hash="tune", tables={"tune_data": data})
    settings = {**tiny_study_settings(path, tiny_model_dir), "tune": {"batch_size": 4, "max_response_tokens": 8}}
    monkeypatch.setattr(bench, "export_embedded_base", lambda: tiny_model_dir)
    results = {r.name: r for r in run_bench(parse_config(settings), which="tune", new_tokens=4, repeats=1, n_prompts=8)}
    steps = ["float32, head in every row", "float32, head once per batch", "bfloat16 autocast, head once per batch"]
    assert all(results[f"tune step, {name}"].value > 0 for name in steps)
    assert results["tune step, float32, head once per batch"].detail.startswith("2 steps of 4 from tune_data, head 2 tokens")
    assert results["tune step: head in every row / once"].value == pytest.approx(
        results[f"tune step, {steps[0]}"].value / results[f"tune step, {steps[1]}"].value)
    with pytest.raises(ExplorerError, match="no `tune:` section"):
        run_bench(parse_config(tiny_study_settings(path, tiny_model_dir)), which="tune", new_tokens=4, repeats=1,
                  n_prompts=8)


# The app on a store whose stages after `generate` are still being built.

def _partial_store(path: Path, full: Path) -> None:
    """`full`'s prompts and generate stages only, planned like a whole study."""
    for stage, tables in (("prompts", ["prompts"]),
                          ("generate", ["generations", "refusal_rates", "judge_agreement", "refusal_tokens"])):
        store.write_stage(path, run=store.RunRecord(study="tiny", stage=stage, models=("base", "other"),
                                                    dataset="builtin", config={}),
                          input_hash=stage, tables={name: store.read_table(full, name).drop(columns="run_id")
                                                    for name in tables},
                          meta={store.STUDY_STAGES_KEY: json.dumps(PLANNED)})


def _building(path: Path, current: str, bars: list[dict]) -> None:
    """A progress record of a build running now (this process stands in for it) in stage `current`."""
    done = PLANNED[:PLANNED.index(current)]
    progress.record_path(path).write_text(json.dumps({
        "state": "running", "pid": os.getpid(), "command": "python -m precompute run", "started_at": time.time(),
        "stages": [{"name": name, "status": "ran" if name in done else "running" if name == current else "pending",
                    "seconds": 1.0 if name in done else None} for name in PLANNED],
        "current": {"stage": current, "started_at": time.time() - 300, "bars": bars}, "error": "",
        "timings": {current: {**CONDITIONS, "seconds": 2400.0, "finished_at": 0.0}}}))


PAGES = ("findings", "overview", "directions", "features", "circuits", "steering", "prompts", "compare")
WAITING = {"directions": "`directions`, which the build running in the background is running now",
           "features": "`saes`, which the build running in the background runs after `directions`",
           "circuits": "`circuits`, which the build running in the background runs after `directions`",
           "steering": "`directions`, which the build running in the background is running now"}


def test_every_page_renders_while_later_stages_are_built(tmp_path: Path, tiny_store: Path, monkeypatch) -> None:
    path = tmp_path / "stores" / "partial.duckdb"
    path.parent.mkdir()
    _partial_store(path, tiny_store)
    _building(path, "directions", [{"desc": "score candidates", "n": 21, "total": 84, "unit": "candidate",
                                    "elapsed": 600.0}])
    monkeypatch.setenv("REFUSAL_EXPLORER_STORE", str(path))
    app = AppTest.from_file(str(MAIN), default_timeout=60).run()
    for page in PAGES:
        app.switch_page(f"views/{page}.py").run()
        assert not app.exception and not app.error, page
        panel = [element.value for element in app.sidebar.markdown]
        assert "**Building the study**: stage 4 of 7, `directions`" in panel, page
        bar = app.sidebar.get("progress")[0].proto
        assert bar.value == 25 and bar.text == "score candidates: 21 of 84 candidate"
        caption = app.sidebar.caption[-1].value
        assert caption == ("Running for 5 min; about 30 min left in this step; the whole stage took 40 min last "
                           "time. Pages fill in as their stages land.")
        waiting = [info.value for info in app.info if "the page fills in when it lands" in info.value]
        assert bool(waiting) == (page in WAITING), page
        if page in WAITING:
            assert WAITING[page] in waiting[0] and app.session_state["follow_build"]
    app.switch_page("views/findings.py").run()
    assert "**Building the study**: stage 4 of 7, `directions`" in [m.value for m in app.main.markdown]
    stages = next(m.value for m in app.main.markdown if "`prompts`" in m.value)
    assert "- ⏳ `directions` (building now)" in stages and "- ✅ `generate`" in stages and "- ⬜ `saes`" in stages
    assert app.session_state["follow_build"]  # the findings grow with each stage


def test_a_cold_start_waits_for_the_store_and_a_failed_build_says_how_to_resume(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "stores" / "cold.duckdb"
    path.parent.mkdir()
    _building(path, "prompts", [])
    monkeypatch.setenv("REFUSAL_EXPLORER_STORE", str(path))
    app = AppTest.from_file(str(MAIN), default_timeout=60).run()
    assert not app.exception
    assert "`prompts`, which the build running in the background is running now" in app.info[0].value
    assert "**Building the study**: stage 1 of 7, `prompts`" in [m.value for m in app.sidebar.markdown]
    assert not app.sidebar.get("progress")  # no bar open yet

    record = json.loads(progress.record_path(path).read_text())
    record.update(state="failed", error="RuntimeError: out of memory", command="python -m precompute run --config c.yaml")
    progress.record_path(path).write_text(json.dumps(record))
    app.run()
    assert not app.exception
    failed = app.sidebar.error[0].value
    assert failed.startswith("The build failed in stage `prompts`: RuntimeError: out of memory")
    assert "```\npython -m precompute run --config c.yaml\n```" in failed
    assert "python -m precompute run" in app.info[0].value and "No study store" in app.info[0].value
