#!/usr/bin/env bash
# HALO layer selection on SLURM as three dependent jobs: the alignment, a job array that scores the layers in
# SHARDS shards, and the merge that writes the plan. Prints the three job ids.
#
#   SHARDS=8 launch/slurm/select_array.sh teacher=runs/teacher output=runs/select
#   SHARDS=8 SBATCH_OPTIONS="--partition gpu --gpus-per-node 1 --time 2:00:00" launch/slurm/select_array.sh ...
#
# Arguments: Hydra overrides of recipes/select.yaml (output= is required: the three jobs share it).
#   SHARDS          array tasks of the sweep (default 4; at most the number of layers)
#   SBATCH_OPTIONS  extra sbatch options for all three jobs
set -euo pipefail

die() { echo "select_array.sh: $*" >&2; exit 2; }

SHARDS=${SHARDS:-4}
[[ "$SHARDS" =~ ^[1-9][0-9]*$ ]] || die "SHARDS='$SHARDS' is not a positive integer"
[[ " $* " == *" output="* ]] || die "give output=<folder>: the alignment, the shards and the merge share it"
here=$(cd "$(dirname "$0")" && pwd)
read -r -a options <<< "${SBATCH_OPTIONS:-}"
align=$(sbatch --parsable "${options[@]}" "$here/select.sbatch" "$@" align_only=true)
sweep=$(sbatch --parsable "${options[@]}" --array "0-$((SHARDS - 1))" --dependency "afterok:${align%%;*}" \
        "$here/select.sbatch" "$@")
merge=$(sbatch --parsable "${options[@]}" --dependency "afterok:${sweep%%;*}" "$here/select.sbatch" "$@")
echo "alignment ${align%%;*}  sweep ${sweep%%;*} (array of $SHARDS)  merge ${merge%%;*}"
