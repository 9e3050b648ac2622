"""The cluster job scripts: scheduler directives, a real shard / merge / finish run through them, and
the job chain submit.sh submits (against fake sbatch / qsub)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.data import store

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "precompute" / "cluster"
SCRIPTS = ("slurm_array.sh", "pbs_array.sh", "merge.sh", "finish.sh", "submit.sh")
DEFAULT_STEPS = ["generate", "directions", "directions", "saes", "steering", "circuits"]


def test_scripts_use_the_schedulers_own_arrays() -> None:
    assert sorted(p.name for p in CLUSTER.glob("*.sh")) == sorted(SCRIPTS)
    slurm, pbs, merge, finish = ((CLUSTER / name).read_text() for name in SCRIPTS[:4])
    assert "#SBATCH --gres=gpu:1" in slurm and "#SBATCH --job-name=refusal-shard" in slurm
    assert '--shard "${TASK}/${SHARDS}"' in slurm and "TASK=${SLURM_ARRAY_TASK_ID:?" in slurm
    assert "#PBS -N refusal-shard" in pbs and "TASK=${PBS_ARRAY_INDEX:?" in pbs and "ngpus=1" in pbs
    for array in (slurm, pbs):  # the range comes from submit.sh's command line, so SHARDS is the only knob
        assert "#SBATCH --array" not in array and "#PBS -J" not in array and '${STAGE:+--stage "$STAGE"}' in array
    for script in (merge, finish):  # one GPU under either scheduler
        assert "#SBATCH --gres=gpu:1" in script and "ngpus=1" in script
        assert 'cd "${SLURM_SUBMIT_DIR:-${PBS_O_WORKDIR:-.}}"' in script and "set -euo pipefail" in script
    assert "#SBATCH --time=24:00:00" in merge and "#PBS -l walltime=24:00:00" in merge  # saes trains there
    assert 'merge --config "$CONFIG" --shards "$SHARDS" ${STAGE:+--stage "$STAGE"}' in merge
    assert 'run --config "$CONFIG"' in finish and "--shard" not in finish
    for name in SCRIPTS:
        subprocess.run(["bash", "-n", str(CLUSTER / name)], check=True)
        assert os.access(CLUSTER / name, os.X_OK), name


def _script(name: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER / name), *args], check=False, env=os.environ | env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_array_tasks_then_merge_then_finish(tmp_path, tiny_model_dir) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "study": "tiny", "store": str(tmp_path / "tiny.duckdb"), "models": {"base": str(tiny_model_dir)},
        "prompts": {"test_fraction": 0.1}, "generation": {"max_new_tokens": 2, "batch_size": 64},
    }))
    env = {"CONFIG": str(config), "SHARDS": "2", "PYTHON": sys.executable}
    first = _script("slurm_array.sh", env | {"SLURM_ARRAY_TASK_ID": "1", "SLURM_SUBMIT_DIR": str(REPO)})
    assert first.returncode == 0, first.stderr
    assert "Stage generate, shard 1/2: written to" in first.stderr
    assert (tmp_path / "tiny.shards" / "generate" / "shard-1-of-2" / "manifest.json").is_file()
    early = _script("merge.sh", env | {"STAGE": "generate"})  # as if the dependency were missing: shard 2 not done
    assert early.returncode == 2 and "shard 2/2 of stage generate is missing" in early.stderr
    assert store.stage_hash(tmp_path / "tiny.duckdb", "generate") is None
    second = _script("pbs_array.sh", env | {"PBS_ARRAY_INDEX": "2", "PBS_O_WORKDIR": str(REPO), "STAGE": "generate"})
    assert second.returncode == 0, second.stderr
    assert "Stage generate, shard 2/2: written to" in second.stderr
    merged = _script("merge.sh", env | {"STAGE": "generate"})
    assert merged.returncode == 0, merged.stderr
    assert "generate   merged" in merged.stderr
    finish = _script("finish.sh", {"CONFIG": str(config), "PYTHON": sys.executable})
    assert finish.returncode == 0, finish.stderr
    assert "generate   skipped" in finish.stderr and "generate   merged" not in finish.stderr
    prompts = store.read_table(tmp_path / "tiny.duckdb", "prompts")
    generations = store.read_table(tmp_path / "tiny.duckdb", "generations")
    assert len(generations) == (prompts["split"] == "test").sum()


FAKE_SBATCH = """#!/bin/bash
id=$(( 1001 + $(wc -l < "$SUBMIT_LOG") ))
printf '%s\\t' "$@" >> "$SUBMIT_LOG"; echo >> "$SUBMIT_LOG"
echo "$id"
"""
FAKE_QSUB = """#!/bin/bash
id=$(( 1001 + $(wc -l < "$SUBMIT_LOG") ))
printf '%s\\t' "$@" >> "$SUBMIT_LOG"; echo >> "$SUBMIT_LOG"
if [[ " $* " == *" -J "* ]]; then echo "$id[].pbs"; else echo "$id.pbs"; fi
"""


def _submit(tmp_path: Path, scheduler: str, **env: str) -> tuple[list[dict[str, str]], list[str]]:
    """Run submit.sh with fake sbatch and qsub first on PATH: each submission's options (the job
    script under "script"), and the lines submit.sh printed."""
    bin_dir, log = tmp_path / "bin", tmp_path / f"{scheduler}.log"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("sbatch", FAKE_SBATCH), ("qsub", FAKE_QSUB)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log.write_text("")
    config = tmp_path / "study.yaml"
    config.write_text("study: study\n")
    result = _script("submit.sh", {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SUBMIT_LOG": str(log),
                                   "CONFIG": str(config), "SHARDS": "3"} | env, scheduler)
    assert result.returncode == 0, result.stderr
    calls = []
    for line in log.read_text().splitlines():
        *options, script = line.rstrip("\t").split("\t")
        if scheduler == "slurm":
            call = {name: value for name, _, value in (option.partition("=") for option in options)}
        else:
            assert len(options) % 2 == 0, options
            call = dict(zip(options[::2], options[1::2]))
        calls.append(call | {"script": script})
    return calls, result.stdout.splitlines()


def _variables(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def test_submit_chains_slurm_jobs(tmp_path) -> None:
    calls, printed = _submit(tmp_path, "slurm")
    ids = [str(1001 + i) for i in range(len(calls))]
    steps = len(DEFAULT_STEPS)
    assert [c["script"] for c in calls] == (["precompute/cluster/slurm_array.sh", "precompute/cluster/merge.sh"] * steps
                                            + ["precompute/cluster/finish.sh"])
    assert all(c.get("--parsable") == "" for c in calls)
    exported = [_variables(c["--export"]) for c in calls]
    assert all(c["--export"].startswith("ALL,") for c in calls)
    assert all(v["CONFIG"] == str(tmp_path / "study.yaml") and v["SHARDS"] == "3" for v in exported)
    assert [v.get("STAGE") for v in exported] == [s for step in DEFAULT_STEPS for s in (step, step)] + [None]
    assert [c.get("--array") for c in calls] == ["1-3", None] * steps + [None]
    assert [c.get("--dependency") for c in calls] == [None] + [f"afterok:{i}" for i in ids[:-1]]
    assert all(c.get("--kill-on-invalid-dep") == "yes" for c in calls[1:])
    assert [line.split()[0] for line in printed] == ids
    assert printed[0] == "1001  generate: 3 shards (slurm_array.sh)" and "finish" in printed[-1]


def test_submit_chains_pbs_jobs(tmp_path) -> None:
    calls, printed = _submit(tmp_path, "pbs")
    steps = len(DEFAULT_STEPS)
    ids = [f"{1001 + i}[].pbs" if i % 2 == 0 and i < 2 * steps else f"{1001 + i}.pbs" for i in range(len(calls))]
    assert [c["script"] for c in calls] == (["precompute/cluster/pbs_array.sh", "precompute/cluster/merge.sh"] * steps
                                            + ["precompute/cluster/finish.sh"])
    exported = [_variables(c["-v"]) for c in calls]
    assert all(v["CONFIG"] == str(tmp_path / "study.yaml") and v["SHARDS"] == "3" for v in exported)
    assert [v.get("STAGE") for v in exported] == [s for step in DEFAULT_STEPS for s in (step, step)] + [None]
    assert [c.get("-J") for c in calls] == ["1-3", None] * steps + [None]
    # a merge waits for every subjob of its array; an array and finish wait for the merge before them
    expected = [None] + [f"depend=afterokarray:{ids[i]}" if i % 2 == 0 else f"depend=afterok:{ids[i]}"
                         for i in range(2 * steps)]
    assert [c.get("-W") for c in calls] == expected
    assert [line.split()[0] for line in printed] == ids


@pytest.mark.parametrize("scheduler", ["slurm", "pbs"])
def test_submit_takes_the_steps_of_the_config(tmp_path, scheduler) -> None:
    calls, _ = _submit(tmp_path, scheduler, STEPS="generate directions directions")
    stage = [_variables(c["--export" if scheduler == "slurm" else "-v"]).get("STAGE") for c in calls]
    assert stage == ["generate"] * 2 + ["directions"] * 4 + [None]
    assert calls[-1]["script"] == "precompute/cluster/finish.sh"


def test_submit_refuses_a_bad_call(tmp_path) -> None:
    for env, args in (({"SHARDS": "3"}, ("slurm",)), ({"CONFIG": str(tmp_path / "none.yaml")}, ("pbs",)),
                      ({"CONFIG": str(REPO / "precompute" / "configs" / "demo.yaml"), "SHARDS": "0"}, ("slurm",)),
                      ({"CONFIG": str(REPO / "precompute" / "configs" / "demo.yaml")}, ("lsf",))):
        result = _script("submit.sh", {"PATH": "/nonexistent:/usr/bin:/bin"} | env, *args)
        assert result.returncode != 0 and result.stdout == "", (env, args, result.stderr)
