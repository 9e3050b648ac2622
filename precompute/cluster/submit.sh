#!/bin/bash
# Submit a whole sharded study build, chained with the scheduler's own dependencies: for each step,
# an array of SHARDS one-GPU tasks (slurm_array.sh / pbs_array.sh, after the previous merge), then
# its merge (merge.sh, after every task succeeded); finally finish.sh (any stage left) after the last merge.
# From the repository root on the login node:
#   CONFIG=precompute/configs/gemma-2-2b-it.yaml SHARDS=8 precompute/cluster/submit.sh slurm|pbs
# directions appears twice: its select round, then its evaluate round. A config without some of
# these sections lists only its own steps, e.g. STEPS="generate directions directions".
# A failed job cancels the jobs after it; resubmit from the failed step with STEPS (finished,
# unchanged shards are skipped).
set -euo pipefail
usage="usage: CONFIG=<study config> SHARDS=<N> [STEPS=\"generate ...\"] $0 slurm|pbs"
[[ $# -eq 1 && ( $1 == slurm || $1 == pbs ) && -n ${CONFIG:-} ]] || { echo "$usage" >&2; exit 2; }
SCHEDULER=$1
SHARDS=${SHARDS:-8}
STEPS_DEFAULT=(generate directions directions saes steering circuits)  # the sharded stages, in order
if [[ -n "${STEPS:-}" ]]; then read -r -a steps <<< "$STEPS"; else steps=("${STEPS_DEFAULT[@]}"); fi
HERE=precompute/cluster
[[ -f "$HERE/submit.sh" ]] || { echo "run $0 from the repository root (the jobs start there)" >&2; exit 2; }
[[ -f "$CONFIG" ]] || { echo "CONFIG=$CONFIG: no such file" >&2; exit 2; }
[[ "$SHARDS" =~ ^[1-9][0-9]*$ ]] || { echo "SHARDS=$SHARDS is not a shard count" >&2; exit 2; }
(( ${#steps[@]} )) || { echo "STEPS is empty" >&2; exit 2; }
VARS="CONFIG=$CONFIG,SHARDS=$SHARDS${PYTHON:+,PYTHON=$PYTHON}"

# submit KIND AFTER AFTER_KIND SCRIPT STAGE: submits SCRIPT (an array of SHARDS tasks if KIND is
# array) after job AFTER (none if empty; an array or a job: PBS names the two differently) and
# prints the new job's id.
submit() {
    local kind=$1 after=$2 after_kind=$3 script=$4 stage=$5 args=() id
    case "$SCHEDULER" in
        slurm)
            args=(--parsable --export="ALL,$VARS${stage:+,STAGE=$stage}")
            [[ $kind == array ]] && args+=(--array="1-$SHARDS")
            [[ -n $after ]] && args+=(--dependency="afterok:$after" --kill-on-invalid-dep=yes)
            id=$(sbatch "${args[@]}" "$HERE/$script" | cut -d';' -f1)  # --parsable: id[;cluster]
            ;;
        pbs)
            args=(-v "$VARS${stage:+,STAGE=$stage}")
            [[ $kind == array ]] && args+=(-J "1-$SHARDS")
            if [[ -n $after && $after_kind == array ]]; then args+=(-W "depend=afterokarray:$after")
            elif [[ -n $after ]]; then args+=(-W "depend=afterok:$after"); fi
            id=$(qsub "${args[@]}" "$HERE/$script")
            ;;
    esac
    [[ -n $id ]] || { echo "$SCHEDULER gave no job id for $script: stopped (the jobs above are queued)" >&2; return 1; }
    echo "$id"
}

array_script=${SCHEDULER}_array.sh
merge=""
for step in "${steps[@]}"; do
    array=$(submit array "$merge" job "$array_script" "$step")
    echo "$array  $step: $SHARDS shards ($array_script)${merge:+, after $merge}"
    merge=$(submit job "$array" array merge.sh "$step")
    echo "$merge  $step: merge, after $array"
done
finish=$(submit job "$merge" job finish.sh "")
echo "$finish  finish: any stage left unsharded, after $merge"
