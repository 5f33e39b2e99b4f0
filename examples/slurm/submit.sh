#!/bin/bash
# Submits the array of shard jobs and the dependent merge:
#   PROJECT=... CHECKPOINT=... SHARDS=8 SHARD_ROOT=... MINE_ARGS="--labeler sam --sam ..." \
#     examples/slurm/submit.sh
# Prints the two job ids. Environment variables reach the jobs (sbatch's default --export=ALL).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
: "${SHARDS:?set SHARDS}"
array=$(sbatch --parsable --array=0-$((SHARDS - 1)) "$here/mine-array.sbatch")
merge=$(sbatch --parsable --dependency=afterok:"${array%%;*}" ${MERGE_SBATCH_ARGS:-} "$here/merge.sbatch")
echo "array $array"
echo "merge $merge"
