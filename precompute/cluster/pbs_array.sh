#!/bin/bash
# One shard of the next per-prompt stage per PBS array subjob, one GPU each: generate, directions
# (twice: round select, then round evaluate), saes or steering, whichever the store lacks first
# (or STAGE=name). Each array needs a merge (merge.sh) before the next one. submit.sh submits the
# whole chain; by hand, from the repository root (the -J range must be 1-N for SHARDS=N):
#   ARRAY=$(qsub -J 1-8 -v CONFIG=precompute/configs/gemma-2-2b-it.yaml,SHARDS=8,STAGE=generate precompute/cluster/pbs_array.sh)
# Site-specific resource syntax varies (e.g. ngpus vs gpus=1 in -l nodes): adapt the -l lines.
#PBS -N refusal-shard
#PBS -l select=1:ncpus=8:ngpus=1:mem=64gb
#PBS -l walltime=06:00:00
#PBS -j oe
set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
CONFIG=${CONFIG:?set CONFIG to a study config, e.g. CONFIG=precompute/configs/gemma-2-2b-it.yaml}
SHARDS=${SHARDS:-8}
PYTHON=${PYTHON:-.venv/bin/python}
TASK=${PBS_ARRAY_INDEX:?not inside a PBS array: submit with qsub -J 1-${SHARDS}}
# Re-running a subjob redoes only its own shard; a finished, unchanged shard is skipped.
"$PYTHON" -m precompute run --config "$CONFIG" --shard "${TASK}/${SHARDS}" ${STAGE:+--stage "$STAGE"}
