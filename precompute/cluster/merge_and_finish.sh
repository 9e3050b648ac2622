#!/bin/bash
# After every shard succeeded: merge the partitions into the study store, then run the stages that
# need all prompts at once (directions, saes, steering, circuits) on one GPU. Works under SLURM and PBS
# (each reads only its own directives). Submit it dependent on the array job:
#   SLURM: sbatch --dependency=afterok:$ARRAY --export=ALL,CONFIG=...,SHARDS=8 precompute/cluster/merge_and_finish.sh
#   PBS:   qsub -W depend=afterokarray:$ARRAY -v CONFIG=...,SHARDS=8 precompute/cluster/merge_and_finish.sh
#SBATCH --job-name=refusal-finish
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --output=refusal-finish-%j.out
#PBS -N refusal-finish
#PBS -l select=1:ncpus=8:ngpus=1:mem=128gb
#PBS -l walltime=24:00:00
#PBS -j oe
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-${PBS_O_WORKDIR:-.}}"
CONFIG=${CONFIG:?set CONFIG to the study config the shards ran}
SHARDS=${SHARDS:-8}
PYTHON=${PYTHON:-.venv/bin/python}
# merge names any missing or outdated shard and exits non-zero before touching the store.
"$PYTHON" -m precompute merge --config "$CONFIG" --shards "$SHARDS"
"$PYTHON" -m precompute run --config "$CONFIG"
