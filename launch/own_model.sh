#!/usr/bin/env bash
# Continued pretraining of your own Hugging Face checkpoint, start to finish, on 2 CPU ranks under ZeRO-3:
# prep with the model directory as tokenizer → GeRe cache (as the run trains) → CPT with 15% general mix and TM replay →
# export (verified) → eval base vs tuned. The corpora are the embedded stdlib sample (domain: code,
# general: docs); for your own data write a prep.yaml (README: Data prep) and a training YAML instead.
#   launch/own_model.sh MODEL_DIR [OUT=runs/own_model] [STEPS=10]
# e.g. launch/own_model.sh "$(python -m pipeline.real_models smollm2 | cut -f2)"
set -euo pipefail
model=$(realpath "$1"); out=${2:-runs/own_model}; steps=${3:-10}
cd "$(dirname "$0")/.."
mkdir -p "$out"; out=$(realpath "$out")
python -m data_prep demo --small --out "$out" --tokenizer "$model" -q
cat > "$out/cpt.yaml" <<YAML
run_dir: $out/run
steps: $steps
deepspeed: $PWD/ds_configs/zero3_cpu.json
model: {path: $model}
data: {prep: $out/prep}
optim: {lr: 1.0e-4, warmup_steps: 2}
batch: {micro_batch: 1, grad_accum: 1}
replay: {strategy: tm, cache: $out/gere_cache, samples_per_step: 2}
checkpoint: {every: 0}
eval: {max_docs: 16}
YAML
port=$(python -c 'from pipeline.launch import free_port; print(free_port())')
# the GeRe cache as this run replays (2 ZeRO-3 ranks, its dtype and replay rows per forward), then the run
deepspeed --num_gpus 2 --master_port "$port" --module pipeline.gere --config "$out/cpt.yaml"
deepspeed --num_gpus 2 --master_port "$port" --module pipeline.train --config "$out/cpt.yaml"
python -m pipeline.export --run "$out/run" --out "$out/hf" --verify
python -m pipeline.eval --model "$out/hf" --base "$model" --prep "$out/prep" --cache "$out/gere_cache" --max-docs 24 \
    --out "$out/eval.json"
