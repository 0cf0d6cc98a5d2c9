#!/usr/bin/env bash
# Every check the CPU cannot make, in one run on one GPU (a lent machine gives a session ~15 minutes):
#   bash bench/gpu_wheels.sh              # once, where pip works: what the device image lacks → .whl/
#   bash bench/gpu_checks.sh [CHECK...]   # on the GPU machine, with .whl carried; all checks by default
# The whole script holds to GPU_CHECKS_BUDGET seconds (default 540, under one device call's 600), the wheel
# install included: each check runs under its own limit or the time left, whichever is less, and the decisive
# checks run first (kernels, then the training step's MFU and TM at step 1). Each writes OUT/<name>.txt
# (OUT: $OUT, else bench/results/gpu), its exit status last, so one that fails, hangs or is skipped for want of
# time leaves the others' results (SUMMARY.txt lists each check's status and seconds):
#   device        torch, CUDA, GPU, and the versions that ran
#   prep          the demo's data (stdlib text, a SentencePiece tokenizer, 512-token rows) for train_step
#   kernel_tests  the TM Triton kernel compiled for this GPU and the chunked head loss on cuBLAS, each against
#                 its PyTorch reference in fp32 and bf16 (tests/test_tm_loss.py, tests/test_linear_ce.py)
#   tm_loss       bench/tm_loss.py at Llama-8B replay shapes: time and bandwidth vs a device-to-device copy
#   loss_memory   bench/loss_memory.py at hidden 4096, 2 x 4096 tokens, bf16, KD on 15% of the tokens
#   joint_kl      bench/joint_kl_floor.py at the 1B shape in bf16: the KL floor of replay KL in the task rows'
#                 forward against one step's KL (replay.forward auto keeps kl samples apart on a GPU until then);
#                 sdpa, as the image has no flash-attn: an upper bound for flash attention, which auto packs with
#   train_step    bench/train_step.py, a from-config Llama-3.2-1B shape on one GPU in bf16 under ZeRO-3: this
#                 loop vs the HF Trainer (tokens/s, MFU), GeRe overhead, and TM at step 1 with the cache built
#                 from the run's config (flash_attention_2 where flash_attn imports, else sdpa)
# Not covered by one GPU: NCCL across ranks and nodes. GPU_CHECKS_SMOKE=1 runs the same steps on the CPU at
# toy sizes with the Python on PATH (the project's venv), to check the plumbing where there is no GPU.
set -uo pipefail
SECONDS=0
budget=${GPU_CHECKS_BUDGET:-540}
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "${GPU_CHECKS_SMOKE:-0}" != 1 ] && compgen -G ".whl/*" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --target /tmp/gpu-checks-site .whl/* || exit 1
    export PYTHONPATH=/tmp/gpu-checks-site:$PWD PATH=/tmp/gpu-checks-site/bin:$PATH
fi

wanted=" ${*:-device kernel_tests prep train_step joint_kl tm_loss loss_memory} "
echo "install: ${SECONDS} s of the ${budget} s budget" >"$out/SUMMARY.txt"
check() { # check NAME SECONDS COMMAND...: runs when NAME is wanted, within its limit and the time left
    local name=$1 limit=$2 left=$((budget - SECONDS)) started=$SECONDS
    shift 2
    [[ $wanted == *" $name "* ]] || return 0
    if ((left < 10)); then
        echo "skipped: ${left} s of the ${budget} s budget left" >"$out/$name.txt"
        echo "$name skipped (budget spent)" | tee -a "$out/SUMMARY.txt"
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit $limit s): $*"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "rc=$rc" >>"$out/$name.txt"
    echo "$name rc=$rc $((SECONDS - started)) s" >>"$out/SUMMARY.txt"
    tail -n 4 "$out/$name.txt"
}

if [ "${GPU_CHECKS_SMOKE:-0}" = 1 ]; then
    device=cpu
    tm_loss=(--device cpu --batch 1 --length 64 --hidden 256 --iters 1)
    loss_memory=(--device cpu --vocab 4096 --seq-len 512 --hidden 64 --repeats 1 --distilled 0.15)
    demo=(--small --workers 2)
    joint_kl=(--device cpu --dtype bfloat16 --model tiny --vocab 4096 --seq-len 512 --replay-len 128 --seeds 0)
    train_step=(--model tiny --steps 1 --warmup 0 --repeats 1)
else
    device=cuda
    tm_loss=(--device cuda --batch 2 --length 4096 --hidden 4096 --dtype bfloat16)
    loss_memory=(--device cuda --hidden 4096 --rows 2 --dtype bfloat16 --distilled 0.15)
    demo=(--workers 8)
    joint_kl=(--device cuda --dtype bfloat16 --model 1b --seq-len 4096 --replay-len 1024 --seeds 0 1)
    train_step=(--model 1b --deepspeed ds_configs/zero3_bf16.json --dtype bfloat16 --micro-batch 16
        --steps 10 --warmup 3 --repeats 1)
fi
prep=/tmp/gpu-checks-demo # the demo's data, built once by the prep check for train_step

check device 30 python3 -c "
import torch, triton, transformers, deepspeed
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print(f'{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, '
      f'transformers {transformers.__version__}, deepspeed {deepspeed.__version__}')"
attn=sdpa
python3 -c "import flash_attn" 2>/dev/null && [ "$device" = cuda ] && attn=flash_attention_2
check kernel_tests 90 env CPT_TEST_DEVICE="$device" python3 -m pytest -q -p no:cacheprovider \
    tests/test_tm_loss.py tests/test_linear_ce.py -k "not sm90"
check prep 60 python3 -m data_prep demo --out "$prep" --quiet "${demo[@]}"
check train_step 180 deepspeed --num_gpus 1 --module bench.train_step --prep "$prep/prep" --attn "$attn" \
    "${train_step[@]}"
check joint_kl 60 python3 -m bench.joint_kl_floor "${joint_kl[@]}"
check tm_loss 50 python3 -m bench.tm_loss "${tm_loss[@]}"
check loss_memory 80 python3 -m bench.loss_memory "${loss_memory[@]}"
echo "total: ${SECONDS} s" >>"$out/SUMMARY.txt"
