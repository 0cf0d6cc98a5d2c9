#!/usr/bin/env bash
# The whole pipeline on the embedded default, on CPU (see pipeline/demo.py): sample corpora, a tiny base
# model, then `cpt run` on a run file: prep, continued pretraining with replay KL on 2 ZeRO-3 ranks,
# export and the report card.
#   launch/demo.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pipeline.demo "$@"
