#!/usr/bin/env bash
# Data prep on many machines: a SLURM array builds K independent pieces of every source,
# then one dependent job finishes (finalize builds, mix, holdout, replay). Output is
# byte-identical to a single-machine run. Needs a filesystem shared by all nodes.
#   launch/prep_slurm.sh prep.yaml 16 [extra sbatch args...]
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; fi
config=${1:?usage: launch/prep_slurm.sh CONFIG.yaml PIECES [sbatch args]}
pieces=${2:?number of pieces}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
array=$(sbatch --parsable --array=0-$((pieces - 1)) "$@" "$here/prep_piece.sbatch" "$config" "$pieces")
finish=$(sbatch --parsable --dependency=afterok:"$array" --job-name=prep-finish "$@" \
  --wrap "python -m data_prep prepare --config '$config'")
echo "submitted pieces: $array (array of $pieces), finish: $finish"
