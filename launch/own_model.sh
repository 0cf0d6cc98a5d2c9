#!/usr/bin/env bash
# Continued pretraining of your own Hugging Face checkpoint on the embedded sample corpora, start to
# finish, on 2 CPU ranks: `cpt init` writes the run file, `cpt run` runs it at CPU size.
#   launch/own_model.sh MODEL_DIR [OUT=runs/own_model] [STEPS=10]
# e.g. launch/own_model.sh "$(python -m pipeline.real_models smollm2 | cut -f2)"
# Outputs: OUT/run.yaml (edit it for your own corpora), OUT/run/export/ (model and report.md).
set -euo pipefail
usage() { sed -n '2,6p' "$0" | cut -c3-; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
if [[ $# -lt 1 || ! -f ${1}/config.json ]]; then
    usage >&2; echo "error: MODEL_DIR '${1:-}' is not a Hugging Face model directory (no config.json)" >&2; exit 2
fi
steps=${3:-10}
if [[ ! $steps =~ ^[1-9][0-9]*$ ]]; then echo "error: STEPS must be a positive integer, got '$steps'" >&2; exit 2; fi
model=$(realpath "$1"); out=${2:-runs/own_model}
cd "$(dirname "$0")/.."
mkdir -p "$out"; out=$(realpath "$out")
python -c "import sys; from pathlib import Path; from data_prep.demo import write_demo_inputs; \
write_demo_inputs(Path(sys.argv[1]), small=True, tokenizer=False)" "$out"
python -m pipeline init --model "$model" --domain "$out/corpora/domain.jsonl.gz" \
    --general "$out/corpora/general.jsonl.gz" --gpus 2 --run-dir run --out "$out/run.yaml" --force
# CPU size: short rows, a small replay shard, one row a rank a step
exec python -m pipeline run "$out/run.yaml" --set steps="$steps" --set deepspeed=zero3_cpu \
    --set data.seq_len=256 --set data.replay.num_samples=62 --set data.replay.replay_len=256 \
    --set data.holdout.max_docs=24 --set batch.grad_accum=1 --set optim.lr=1e-4 --set optim.warmup_ratio=0.2 \
    --set replay.samples_per_step=2 --set checkpoint.every=0 --set eval.max_docs=16
