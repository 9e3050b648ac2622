#!/bin/bash
# After the last merge: run the stages that are not sharded (tradeoff, and circuits when it was not sharded) on one GPU; every stored,
# up-to-date stage is skipped, and a timed-out run resumes when submitted again. Works under SLURM
# and PBS (each reads only its own directives); submit.sh chains it, e.g. by hand:
#   SLURM: sbatch --dependency=afterok:$MERGE --export=ALL,CONFIG=... precompute/cluster/finish.sh
#   PBS:   qsub -W depend=afterok:$MERGE -v CONFIG=... precompute/cluster/finish.sh
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
CONFIG=${CONFIG:?set CONFIG to the study config}
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m precompute run --config "$CONFIG"
