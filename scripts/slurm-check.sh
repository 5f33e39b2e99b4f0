#!/usr/bin/env bash
# Mining on a real scheduler: starts a single-node Slurm cluster on this machine from Debian's
# packages (munge, slurmctld, slurmd on localhost; no cgroups: proctrack/linuxproc), submits
# examples/slurm's array job (3 shards, oracle labeler on the demo X-rays) and the dependent
# merge job, makes a review while the merge waits, and checks that the merged project equals one
# made by a single `medmine mine` and that the review survived.
#
#   sudo scripts/slurm-check.sh path/to/medmine      # needs root; apt-get install slurm-wlm munge
#
# Runs in CI after the tests (.ci/run). Stops the daemons it started on exit.
set -euo pipefail
medmine=$(realpath "${1:?usage: slurm-check.sh MEDMINE_BINARY}")
repo=$(cd "$(dirname "$0")/.." && pwd)
for tool in slurmctld slurmd munged sbatch python3; do
  command -v $tool >/dev/null || { echo "slurm-check: needs $tool (apt-get install slurm-wlm munge)" >&2; exit 1; }
done
work=$(mktemp -d /tmp/medmine-slurm.XXXXXX)
chmod 755 "$work"
host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

# --- the cluster: munge, then slurmctld and slurmd, all in $work where possible ---
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge /etc/slurm "$work/spool/ctld" "$work/spool/d"
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -f "slurmd -D -f $work" 2>/dev/null || true
  pkill -f "slurmctld -D -f $work" 2>/dev/null || true
}
trap cleanup EXIT
if ! munge -n </dev/null >/dev/null 2>&1; then
  if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
fi
conf="$work/slurm.conf"
cat >"$conf" <<EOF
ClusterName=medmine-check
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$work/spool/ctld
SlurmdSpoolDir=$work/spool/d
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
ReturnToService=2
MpiDefault=none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=check Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
export SLURM_CONF=$conf
slurmctld -D -f "$conf" >"$work/slurmctld.stdout" 2>&1 &
pids+=($!)
slurmd -D -f "$conf" >"$work/slurmd.stdout" 2>&1 &
pids+=($!)
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)' && break
  sleep 1
done
sinfo -h -o "%P %D %T" | grep -qE 'idle|mixed' || {
  echo "slurm-check: the node did not come up" >&2
  tail -20 "$work"/slurm*.log "$work"/*.stdout >&2 || true
  exit 1
}
echo "slurm-check: cluster up ($(sinfo -h -o '%P %D %T %c CPUs'))"

# --- a project, a model, and the same project mined in one go for comparison ---
demo="$repo/assets/demo"
"$medmine" train --device cpu --data "$demo" --train-list "$demo/train.txt" --val-list "$demo/val.txt" \
  --size 32 --base 2 --epochs 2 --batch 4 --labelled-fraction 0.5 --out "$work/run" >/dev/null
"$medmine" project init "$work/proj" >/dev/null
"$medmine" project import "$work/proj" --data "$demo" --split-dir "$demo" --labelled-fraction 0.5 >/dev/null
"$medmine" project status "$work/proj" >/dev/null   # gives the project its id
cp -a "$work/proj" "$work/single"
mine_args="--device cpu --labeler oracle --threshold 0"
# shellcheck disable=SC2086
"$medmine" mine "$work/single" --checkpoint "$work/run/best.safetensors" $mine_args >/dev/null

# --- the example jobs: the array, and the merge held until the review is made ---
export PROJECT=$work/proj CHECKPOINT=$work/run/best.safetensors SHARDS=3 SHARD_ROOT=$work/shards
export MEDMINE=$medmine MINE_ARGS=$mine_args MERGE_SBATCH_ARGS=--hold
cd "$work"
ids=$("$repo/examples/slurm/submit.sh")
echo "$ids"
array=$(awk '/^array/ {print $2}' <<<"$ids")
merge=$(awk '/^merge/ {print $2}' <<<"$ids")
state() { scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | sort -u | cut -d= -f2 | paste -sd,; }
for _ in $(seq 300); do
  s=$(state "$array")
  [[ "$s" =~ ^(COMPLETED,?)+$ ]] && break
  [[ "$s" =~ FAILED|CANCELLED|TIMEOUT ]] && { cat "$work"/medmine-mine-*.out >&2; echo "slurm-check: array job $s" >&2; exit 1; }
  sleep 1
done
[[ "$(state "$array")" =~ ^(COMPLETED,?)+$ ]] || { echo "slurm-check: array job still $(state "$array")" >&2; exit 1; }
# a person reviews one image after the shards read the project, before the merge
reviewed=$("$medmine" project status "$work/proj" --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(sorted(i["name"] for i in s["images"] if i["role"] == "unlabelled")[0])')
"$medmine" review "$work/proj" edit "$reviewed" --mask "$demo/masks/${reviewed%.png}.png" \
  --reviewer slurm-check >/dev/null
scontrol release "$merge"
for _ in $(seq 120); do
  s=$(state "$merge")
  [ "$s" = COMPLETED ] && break
  [[ "$s" =~ FAILED|CANCELLED|TIMEOUT ]] && { cat "$work"/medmine-merge-*.out >&2; exit 1; }
  sleep 1
done
[ "$(state "$merge")" = COMPLETED ] || { echo "slurm-check: merge job $(state "$merge")" >&2; exit 1; }
cat "$work"/medmine-merge-*.out

# --- the merged project equals the single mine, except the reviewed image, kept as reviewed ---
"$medmine" project status "$work/proj" --json >"$work/proj.json"
"$medmine" project status "$work/single" --json >"$work/single.json"
python3 - "$work/proj.json" "$work/single.json" "$reviewed" <<'PY'
import json, sys
merged, single, reviewed = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
key = lambda s: {i["name"]: (i["review"], i["pseudo_label_round"], i["quality"], i["component_change"])
                 for i in s["images"] if i["role"] == "unlabelled"}
m, o = key(merged), key(single)
assert m.keys() == o.keys(), "same images"
assert m[reviewed][0] == "edited" and m[reviewed][1] is None, f"the review stands: {m[reviewed]}"
diff = [n for n in m if n != reviewed and m[n] != o[n]]
assert not diff, f"differ from the single mine: {[(n, m[n], o[n]) for n in diff]}"
assert {s["shard"] for s in merged["shards"]} == {"0/3", "1/3", "2/3"}, merged["shards"]
print(f"slurm-check: merged project equals the single mine on {len(m) - 1} images; the review of {reviewed} stands")
PY
echo "slurm-check: ok"
