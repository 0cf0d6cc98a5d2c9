#!/usr/bin/env bash
# One node's share of a multi-node run, as srun starts it on every node of the job (train_slurm.sbatch):
# this node's ranks under the deepspeed launcher, without SSH, rendezvousing at MASTER:MASTER_PORT.
#   launch/slurm_node.sh "NODE0 NODE1 ..." MASTER GPUS_PER_NODE CONFIG.yaml [--set key=value ...]
# Needs SLURM_NODEID (this node's index in the list); SLURM_JOB_ID names the hostfile.
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; fi
nodes=${1:?usage: launch/slurm_node.sh NODES MASTER GPUS_PER_NODE CONFIG.yaml [--set ...]}
master=${2:?master}; gpus=${3:?gpus per node}; config=${4:?config}
shift 4
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec python -m pipeline.launch --nodes "$nodes" --node-rank "${SLURM_NODEID:?SLURM_NODEID is not set}" \
  --gpus-per-node "$gpus" --master-addr "$master" --master-port "${MASTER_PORT:-29500}" \
  --hostfile "${TMPDIR:-/tmp}/cpt-hostfile-${SLURM_JOB_ID:-local}-$SLURM_NODEID" -- --config "$config" "$@"
