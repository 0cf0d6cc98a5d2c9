#!/usr/bin/env bash
# One training rank, as srun starts it: one task per GPU on every node (train_slurm.sbatch), with no
# launcher between srun and the rank. SLURM's signal before the time limit (or at preemption) then
# reaches the rank itself: the ranks agree on a step, save a checkpoint and exit 0, so srun's
# --kill-on-bad-exit never fires. (Under a launcher, the launcher died at the signal and srun then
# killed the ranks before they could save.)
#   launch/slurm_rank.sh RUN.yaml [--set key=value ...]
# Reads SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, SLURM_NNODES and MASTER_ADDR
# (MASTER_PORT defaults to 29500). Each task sees its node's GPUs and takes GPU SLURM_LOCALID.
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; fi
config=${1:?usage: launch/slurm_rank.sh RUN.yaml [--set key=value ...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export RANK=${SLURM_PROCID:?SLURM_PROCID is not set: run this under srun}
export WORLD_SIZE=${SLURM_NTASKS:?SLURM_NTASKS is not set}
export LOCAL_RANK=${SLURM_LOCALID:?SLURM_LOCALID is not set}
export MASTER_ADDR=${MASTER_ADDR:?MASTER_ADDR is not set: the first node of the job}
export MASTER_PORT=${MASTER_PORT:-29500}
# What the deepspeed launcher would set too: ranks on this node, and this node among the job's
export LOCAL_SIZE=${SLURM_NTASKS_PER_NODE:-$((WORLD_SIZE / ${SLURM_NNODES:-1}))}
export CROSS_RANK=${SLURM_NODEID:-0} CROSS_SIZE=${SLURM_NNODES:-1}
exec python -u -m pipeline.train --config "$config" "$@"
