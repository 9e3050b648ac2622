#!/bin/bash
# One shard of the per-prompt `generate` stage per PBS array subjob, one GPU each.
# From the repository root on the cluster (the -J range must be 1-N for SHARDS=N):
#   ARRAY=$(qsub -v CONFIG=precompute/configs/gemma-2-2b-it.yaml,SHARDS=8 precompute/cluster/pbs_array.sh)
# then precompute/cluster/merge_and_finish.sh with -W depend=afterokarray:$ARRAY (see the README).
# Site-specific resource syntax varies (e.g. ngpus vs gpus=1 in -l nodes): adapt the -l lines.
#PBS -N refusal-generate
#PBS -J 1-8
#PBS -l select=1:ncpus=8:ngpus=1:mem=64gb
#PBS -l walltime=06:00:00
#PBS -j oe
set -euo pipefail
cd "${PBS_O_WORKDIR:-.}"
CONFIG=${CONFIG:?set CONFIG to a study config, e.g. CONFIG=precompute/configs/gemma-2-2b-it.yaml}
SHARDS=${SHARDS:-8}
PYTHON=${PYTHON:-.venv/bin/python}
# Re-running a subjob redoes only its own shard; a finished, unchanged shard is skipped.
"$PYTHON" -m precompute run --config "$CONFIG" --shard "${PBS_ARRAY_INDEX:?not inside a PBS array}/${SHARDS}"
