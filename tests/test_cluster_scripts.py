"""The cluster job scripts: scheduler directives, and a real shard / merge run through them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from engine import store

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "precompute" / "cluster"


def test_scripts_use_the_schedulers_own_arrays() -> None:
    slurm, pbs, finish = ((CLUSTER / name).read_text() for name in
                          ("slurm_array.sh", "pbs_array.sh", "merge_and_finish.sh"))
    assert "#SBATCH --array=1-8" in slurm and "#SBATCH --gres=gpu:1" in slurm
    assert '--shard "${SLURM_ARRAY_TASK_ID' in slurm
    assert "#PBS -J 1-8" in pbs and '--shard "${PBS_ARRAY_INDEX' in pbs
    assert "--dependency=afterok:" in finish and "depend=afterokarray:" in finish
    for script in CLUSTER.glob("*.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)


def _script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER / name)], check=False, env=os.environ | env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_array_tasks_then_merge_and_finish(tmp_path, tiny_model_dir) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "study": "tiny", "store": str(tmp_path / "tiny.duckdb"), "models": {"base": str(tiny_model_dir)},
        "prompts": {"test_fraction": 0.1}, "generation": {"max_new_tokens": 2, "batch_size": 64},
    }))
    env = {"CONFIG": str(config), "SHARDS": "2", "PYTHON": sys.executable}
    first = _script("slurm_array.sh", env | {"SLURM_ARRAY_TASK_ID": "1", "SLURM_SUBMIT_DIR": str(REPO)})
    assert first.returncode == 0, first.stderr
    early = _script("merge_and_finish.sh", env)  # as if the dependency were missing: shard 2 not done
    assert early.returncode == 2 and "shard 2/2 of stage generate is missing" in early.stderr
    second = _script("pbs_array.sh", env | {"PBS_ARRAY_INDEX": "2", "PBS_O_WORKDIR": str(REPO)})
    assert second.returncode == 0, second.stderr
    finish = _script("merge_and_finish.sh", env)
    assert finish.returncode == 0, finish.stderr
    assert "generate   merged" in finish.stderr and "generate   skipped" in finish.stderr
    prompts = store.read_table(tmp_path / "tiny.duckdb", "prompts")
    generations = store.read_table(tmp_path / "tiny.duckdb", "generations")
    assert len(generations) == (prompts["split"] == "test").sum()
