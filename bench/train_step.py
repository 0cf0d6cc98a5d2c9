"""Training throughput: this loop vs the Hugging Face Trainer, and the cost of GeRe replay.

Same model (a small Llama from one seed), data (the demo mixture: packed rows,
per-document position ids), batch, and the same filled DeepSpeed ZeRO-3
config for all variants; tokens/s over --steps timed steps after --warmup.
  1. this loop (``pipeline.training.trainer.Trainer.train_step``), replay off;
  2. HF ``Trainer`` with ``deepspeed=`` the same config, a collator producing
     the same inputs, loss from the model (labels);
  3. this loop with GeRe TM replay (cache built in this script), replay samples
     in a forward of their own (replay.forward: separate);
  4. the same with the samples packed behind the task rows in their forward
     (replay.forward: joint, what auto picks for this model).
gere_overhead = t(4)/t(1) - 1 - replay_share, where replay_share is the replay
rows' tokens (padded to replay_len, as computed) over the task tokens: the
cost beyond the extra tokens themselves (goal <= 0.02); gere_overhead_separate
the same for 3. The loop's variants run --repeats times, interleaved.

On CPU the HF Trainer only runs DeepSpeed in a world of one (accelerate sees
one process on CPU ranks), so it is compared with one rank (with more, it is
left out and ratio_vs_hf_trainer is nan):
    deepspeed --num_gpus 1 --module bench.train_step
On GPUs: deepspeed --num_gpus 8 --module bench.train_step --deepspeed ds_configs/zero3_bf16.json --dtype bfloat16
(--model 1b for Llama-3.2-1B's shape; bench/gpu_checks.sh runs it on one GPU). On a known GPU each row also
gets its MFU (6·N FLOPs a token over the dense bf16 peak, pipeline.training.metrics).
Last line: ratio_vs_hf_trainer=<x> gere_overhead=<y> gere_overhead_separate=<z> mfu=<m> (nan on CPU)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
from transformers import Trainer as HFTrainer
from transformers import TrainerCallback, TrainingArguments

from bench.harness import clock, device_name, finish, sync, table, workspace
from cpt_core.logs import setup_logging
from data_prep.prep_dir import PrepDir
from data_prep.tokenizer import load_tokenizer
from pipeline.config import load_train_config
from pipeline.gere.build import build_cache_for_training
from pipeline.runtime.distributed import init_distributed
from pipeline.runtime.ds_config import filled_ds_config
from pipeline.runtime.model import ModelSource, load_causal_lm
from pipeline.training.data import packed_inputs
from pipeline.training.metrics import device_peak_flops, model_flops_utilization
from pipeline.training.trainer import Trainer

MODELS = {
    "tiny": {  # ~3M parameters beside the embeddings: what a CPU times in minutes
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 1024,
    },
    "1b": {  # Llama-3.2-1B's shape (its 128k vocabulary replaced by the prep's): the GPU MFU check
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
    },
}


def overrides(prep: Path, run: Path, args: argparse.Namespace, vocab: int, **extra: str) -> list[str]:
    model = {**MODELS[args.model], "vocab_size": vocab}
    base = {
        "data.prep": str(prep),
        "run_dir": str(run),
        "steps": str(args.warmup + args.steps),
        "deepspeed": str(Path(args.deepspeed).resolve()),
        "model.config": json.dumps(model),
        "model.dtype": args.dtype,
        "model.attn_implementation": args.attn,
        "batch.micro_batch": str(args.micro_batch),
        "optim.lr": "1e-4",
        "log.tensorboard": "false",
        "checkpoint.resume": "never",
    }
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


class Timing(NamedTuple):
    seconds: float  # per step
    tokens: int  # task tokens per step
    replay_tokens: int  # per step, padded to replay_len
    n_params: int
    tm_step1: float  # the TM loss of the first step (nan without TM): 0 when the cache matches the run


def time_ours(cfg_overrides: list[str], args: argparse.Namespace) -> Timing:
    trainer = Trainer(load_train_config(None, cfg_overrides))
    times, parts, train_step = [], [], trainer.train_step
    for step in range(args.warmup + args.steps):
        seconds = clock(lambda: parts.append(train_step()))
        trainer.step += 1
        if step >= args.warmup:
            times.append(seconds)
    tm_step1 = parts[0].get("loss/tm", math.nan)
    replay = trainer.cfg.replay.samples_per_step * trainer.replay.replay_len if trainer.replay else 0
    timing = Timing(
        sum(times) / len(times), trainer.order.global_batch * trainer.seq_len, replay, trainer.n_params, tm_step1
    )
    del trainer
    return timing


def time_hf(cfg_overrides: list[str], args: argparse.Namespace) -> float:
    cfg = load_train_config(None, cfg_overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds = filled_ds_config(cfg, world, MODELS[args.model]["hidden_size"])
    model = load_causal_lm(ModelSource(config=cfg.model.config, seed=cfg.model.seed, dtype=cfg.model.dtype))
    model.config.use_cache = False
    mixture = datasets.load_from_disk(str(PrepDir(cfg.data.prep).read().mixture_rows))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            times.append(time.perf_counter() - self.start)

    targs = TrainingArguments(
        output_dir=str(Path(cfg.run_dir) / "hf"),
        per_device_train_batch_size=cfg.batch.micro_batch,
        gradient_accumulation_steps=cfg.batch.grad_accum,
        max_steps=cfg.steps,
        learning_rate=cfg.peak_lr,
        deepspeed=ds,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=cfg.model.dtype == "bfloat16",
    )

    def collate(rows):
        return packed_inputs({k: [r[k] for r in rows] for k in ("input_ids", "loss_mask", "doc_lens")})

    HFTrainer(model=model, args=targs, train_dataset=mixture, data_collator=collate, callbacks=[Clock()]).train()
    timed = times[args.warmup :]
    return sum(timed) / len(timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", help="data_prep output to train on (default: build the demo's)")
    p.add_argument("--deepspeed", default=str(Path(__file__).resolve().parents[1] / "ds_configs" / "zero3_cpu.json"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny", help="from-config Llama shape (1b: GPU)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--attn", default="sdpa", help="model.attn_implementation (flash_attention_2 where installed)")
    p.add_argument("--replay-per-step", type=int, default=2)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    setup_logging(logging.WARNING)
    init_distributed()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    work, prep = workspace(args.prep)

    vocab = load_tokenizer(PrepDir(prep).read().tokenizer).vocab_size
    cache = work / "cache"
    replay = {
        "replay.strategy": "tm",
        "replay.samples_per_step": str(args.replay_per_step),
        "replay.cache": str(cache),
    }
    variants = {
        "this loop": {},
        f"+ GeRe TM ({args.replay_per_step} replay rows), own forward": {**replay, "replay.forward": "separate"},
        f"+ GeRe TM ({args.replay_per_step} replay rows), in the task forward": {**replay, "replay.forward": "joint"},
    }
    plain, separate, joint = variants
    # The cache first and the HF Trainer last: TrainingArguments(deepspeed=...) leaves a process-wide
    # HfDeepSpeedConfig behind, under which transformers builds any later model partitioned.
    # Built as the joint run replays (on CPU the separate forward gives the same states); every rank takes part.
    build_cache_for_training(load_train_config(None, overrides(prep, work / "c", args, vocab, **variants[joint])))
    timings: dict[str, list[Timing]] = {name: [] for name in variants}
    for repeat in range(args.repeats):  # interleaved, so drift in the machine's speed hits every variant alike
        for i, (name, extra) in enumerate(variants.items()):
            timing = time_ours(overrides(prep, work / f"run-{repeat}-{i}", args, vocab, **extra), args)
            timings[name].append(timing)
            if rank == 0:
                print(f"repeat {repeat}: {name}: {timing.seconds:.3f} s/step", flush=True)
    seconds = {name: [t.seconds for t in runs] for name, runs in timings.items()}
    tm_step1 = {name: max(t.tm_step1 for t in runs) for name, runs in timings.items()}  # the largest over repeats
    tokens, n_params = timing.tokens, timing.n_params  # the same in every run
    replay_tokens = max(t.replay_tokens for runs in timings.values() for t in runs)
    # accelerate runs the HF Trainer in a world of one on CPU ranks, so with more it is not comparable.
    hf_runs = torch.cuda.is_available() or world == 1
    hf_s = time_hf(overrides(prep, work / "hf", args, vocab), args) if hf_runs else math.nan
    torch.distributed.barrier()  # every rank is done with the scratch directory (checkpoints, the demo's data)
    if rank != 0:
        return
    shutil.rmtree(work, ignore_errors=True)
    share = replay_tokens / tokens
    mean = {name: statistics.mean(v) for name, v in seconds.items()}
    spread = {name: statistics.stdev(v) if len(v) > 1 else 0.0 for name, v in seconds.items()}
    print(
        f"\n{world} rank(s) on {device_name()}, model {args.model} {MODELS[args.model]} vocab {vocab} "
        f"({n_params / 1e6:,.0f}M parameters), "
        f"{tokens} task tokens/step; each of {args.repeats} repeats the mean of {args.steps} steps after "
        f"{args.warmup}; ± is the std over repeats"
    )
    # MFU: 6·N FLOPs a token (attention ignored) against the GPU's dense bf16 peak; none on CPU
    peak = device_peak_flops()

    def mfu(seconds: float) -> float:
        return model_flops_utilization(tokens / seconds / world, n_params, peak) if peak else math.nan

    rows = [(name, mean[name], f" ± {spread[name]:.3f}") for name in variants]
    if hf_runs:
        rows.insert(1, ("HF Trainer + same DeepSpeed config (one run)", hf_s, ""))
    cells = [
        (name, f"{s:.3f}{sd}", f"{tokens / s:,.0f}", f"{mean[plain] / s:.2f}x", f"{mfu(s):.1%}") for name, s, sd in rows
    ]
    print(table(("variant", "s/step", "tokens/s", "vs this loop", "MFU"), cells))
    if not hf_runs:
        print("(HF Trainer not run: on CPU it needs a world of one rank)")
    overhead = {name: mean[name] / mean[plain] - 1 - share for name in (separate, joint)}
    print(
        f"replay rows add {share:.1%} tokens (padded to replay_len); measured slowdown: own forward "
        f"{mean[separate] / mean[plain] - 1:.1%}, in the task forward {mean[joint] / mean[plain] - 1:.1%}"
    )
    print(
        f"TM at step 1, the cache built from the joint run's config ({args.dtype}): in the task forward "
        f"{tm_step1[joint]:.3g}, own forward {tm_step1[separate]:.3g} (0: the cache matches what the run computes)"
    )
    figures = {
        "ratio_vs_hf_trainer": hf_s / mean[plain],
        "gere_overhead": overhead[joint],
        "gere_overhead_separate": overhead[separate],
        "mfu": mfu(mean[plain]),
    }
    finish("train_step", figures, {"seconds_per_step": seconds, "tm_step1": tm_step1, "hf_seconds": hf_s})


if __name__ == "__main__":
    main()
