#!/usr/bin/env bash
# Data prep on one machine: every step from one YAML config, worker processes from the config.
#   launch/prep_local.sh prep.yaml
set -euo pipefail
config=${1:?usage: launch/prep_local.sh CONFIG.yaml}
exec python -m data_prep prepare --config "$config"
