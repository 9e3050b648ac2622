#!/bin/bash
# One shard of the next per-prompt stage per SLURM array task, one GPU each: generate, directions
# (twice: round select, then round evaluate), saes or steering, whichever the store lacks first
# (or STAGE=name). Each array needs a merge (merge.sh) before the next one. submit.sh submits the
# whole chain; by hand, from the repository root (the --array range must be 1-N for SHARDS=N):
#   ARRAY=$(sbatch --parsable --array=1-8 --export=ALL,CONFIG=precompute/configs/gemma-2-2b-it.yaml,SHARDS=8,STAGE=generate \
#           precompute/cluster/slurm_array.sh)
#SBATCH --job-name=refusal-shard
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=06:00:00
#SBATCH --output=refusal-shard-%A_%a.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
CONFIG=${CONFIG:?set CONFIG to a study config, e.g. CONFIG=precompute/configs/gemma-2-2b-it.yaml}
SHARDS=${SHARDS:-8}
PYTHON=${PYTHON:-.venv/bin/python}
TASK=${SLURM_ARRAY_TASK_ID:?not inside a SLURM array: submit with sbatch --array=1-${SHARDS}}
# Re-running a task redoes only its own shard; a finished, unchanged shard is skipped.
"$PYTHON" -m precompute run --config "$CONFIG" --shard "${TASK}/${SHARDS}" ${STAGE:+--stage "$STAGE"}
