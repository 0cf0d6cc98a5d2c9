#!/usr/bin/env bash
# Training on one node: every local GPU (or N CPU ranks where there is none).
#   launch/train.sh RUN.yaml [NUM_RANKS] [--set key=value ...]
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; fi
config=${1:?usage: launch/train.sh RUN.yaml [NUM_RANKS] [--set key=value ...]}
if [[ ! -f $config ]]; then echo "error: $config: no such config file" >&2; exit 2; fi
shift
ranks=""
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then ranks="--num_gpus $1"; shift; fi
# shellcheck disable=SC2086
exec deepspeed $ranks --module pipeline.train --config "$config" "$@"
