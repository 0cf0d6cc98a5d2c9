#!/usr/bin/env bash
# The training half of the demo on CPU: data prep on the embedded corpora, the GeRe cache of the base
# model, continued pretraining with TM replay on 2 ZeRO-3 ranks under the deepspeed launcher, export.
#   launch/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -m data_prep demo --out runs/demo -q
python - <<'PY'
import json, yaml
cfg = yaml.safe_load(open("launch/cpt_demo.yaml"))
json.dump(cfg["model"]["config"], open("runs/demo/base_model.json", "w"))
PY
python -m pipeline.gere --model-config runs/demo/base_model.json --seed 0 --replay runs/demo/prep/replay \
  --out runs/demo/gere_cache
deepspeed --num_gpus 2 --module pipeline.train --config launch/cpt_demo.yaml
latest=$(cat runs/demo/cpt/checkpoints/latest)
python -m pipeline.export --checkpoint "runs/demo/cpt/checkpoints/$latest" --out runs/demo/cpt/hf --verify
echo "done: metrics in runs/demo/cpt/metrics.jsonl, model in runs/demo/cpt/hf"
