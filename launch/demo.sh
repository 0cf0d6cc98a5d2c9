#!/usr/bin/env bash
# The whole pipeline on the embedded default, on CPU (see pipeline/demo.py): prep, base pretraining,
# GeRe cache, continued pretraining with replay on 2 ZeRO-3 ranks, evaluation and report.
#   launch/demo.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pipeline.demo "$@"
