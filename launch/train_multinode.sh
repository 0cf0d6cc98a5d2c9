#!/usr/bin/env bash
# Training on several nodes over SSH with a DeepSpeed hostfile (see launch/hostfile.example).
# The repository, the prep output and the run directory must be on a filesystem every node sees.
#   launch/train_multinode.sh launch/hostfile RUN.yaml [--set key=value ...]
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; fi
hostfile=${1:?usage: launch/train_multinode.sh HOSTFILE RUN.yaml [--set key=value ...]}
config=${2:?config}
for f in "$hostfile" "$config"; do [[ -f $f ]] || { echo "error: $f: no such file" >&2; exit 2; }; done
shift 2
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" --module pipeline.train --config "$config" "$@"
