#!/bin/bash
# One shard of the per-prompt `generate` stage per SLURM array task, one GPU each.
# From the repository root on the cluster (the --array range must be 1-N for SHARDS=N):
#   ARRAY=$(sbatch --parsable --export=ALL,CONFIG=precompute/configs/gemma-2-2b-it.yaml,SHARDS=8 \
#           precompute/cluster/slurm_array.sh)
# then precompute/cluster/merge_and_finish.sh with --dependency=afterok:$ARRAY (see the README).
#SBATCH --job-name=refusal-generate
#SBATCH --array=1-8
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=06:00:00
#SBATCH --output=refusal-generate-%A_%a.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
CONFIG=${CONFIG:?set CONFIG to a study config, e.g. CONFIG=precompute/configs/gemma-2-2b-it.yaml}
SHARDS=${SHARDS:-8}
PYTHON=${PYTHON:-.venv/bin/python}
# Re-running a task redoes only its own shard; a finished, unchanged shard is skipped.
"$PYTHON" -m precompute run --config "$CONFIG" --shard "${SLURM_ARRAY_TASK_ID:?not inside a SLURM array}/${SHARDS}"
