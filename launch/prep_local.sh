#!/usr/bin/env bash
# Data prep on one machine: every step from one YAML config, worker processes from the config.
#   launch/prep_local.sh prep.yaml
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; fi
config=${1:?usage: launch/prep_local.sh CONFIG.yaml}
exec python -m data_prep prepare --config "$config"
