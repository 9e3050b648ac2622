#!/bin/bash
# After every task of an array (slurm_array.sh / pbs_array.sh) succeeded: merge its shards, on one
# GPU. The current round of the stage (STAGE, else the first sharded stage the store lacks) is
# merged: directions' select round beside the partitions (its next array tests the direction), the
# last round into the store. The saes merge trains the SAEs, hence the long walltime. Works under
# SLURM and PBS (each reads only its own directives); submit.sh chains it, e.g. by hand:
#   SLURM: sbatch --dependency=afterok:$ARRAY --export=ALL,CONFIG=...,SHARDS=8,STAGE=generate precompute/cluster/merge.sh
#   PBS:   qsub -W depend=afterokarray:$ARRAY -v CONFIG=...,SHARDS=8,STAGE=generate precompute/cluster/merge.sh
#SBATCH --job-name=refusal-merge
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --output=refusal-merge-%j.out
#PBS -N refusal-merge
#PBS -l select=1:ncpus=8:ngpus=1:mem=128gb
#PBS -l walltime=24:00:00
#PBS -j oe
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-${PBS_O_WORKDIR:-.}}"
CONFIG=${CONFIG:?set CONFIG to the study config the shards ran}
SHARDS=${SHARDS:-8}
PYTHON=${PYTHON:-.venv/bin/python}
# merge names any missing or outdated shard and exits non-zero before touching the store.
"$PYTHON" -m precompute merge --config "$CONFIG" --shards "$SHARDS" ${STAGE:+--stage "$STAGE"}
