"""How long a checkpoint save holds up training: DeepSpeed's decoupled writer against a synchronous save.

One model, data and config (a from-config Llama on the demo's prep, ZeRO-3); the two modes differ only in
the DeepSpeed JSON's ``checkpoint.writer`` section ({"type": "python", "decoupled": true} for async). Each
mode: --warmup steps and one warm-up save, then --repeats rounds of [save, the step after it, --plain
plain steps]. A save's block is the save call plus what the step after it takes beyond the median plain
step: the commit's wait for the writers and the writers' competition for the cores, all that training
loses to the save; the commit's wait is shown apart, so what is left is the writers' competition (on a
GPU node training leaves the host's cores to them). The checkpoint's size over the synchronous save time is
the write rate this machine gave.
    python -m bench.checkpoint_save            (one CPU rank)
    deepspeed --num_gpus 8 --module bench.checkpoint_save --deepspeed ds_configs/zero3_bf16.json --dtype bfloat16
Last line: save_block_async_vs_sync=<median async block / median sync block> sync_block_s=<s> async_block_s=<s>
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from bench.harness import Samples, clock, device_name, finish, table, workspace
from cpt_core.logs import setup_logging
from data_prep.prep_dir import PrepDir
from data_prep.tokenizer import load_tokenizer
from pipeline.checkpoint.files import CheckpointDir, checkpoint_root, read_complete
from pipeline.config import load_train_config
from pipeline.runtime.distributed import init_distributed
from pipeline.runtime.ds_json import read_ds_json
from pipeline.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
ASYNC_WRITER = {"type": "python", "decoupled": True}  # "python": no async_io op to build on the nodes


class Rounds(NamedTuple):
    save_s: list[float]  # the save call
    after_s: list[float]  # the step after each save
    wait_s: list[float]  # of which waiting for the writers to finish (the commit before its optimizer step)
    plain_s: list[float]  # steps with no save before them
    checkpoint_bytes: int

    def blocks(self) -> list[float]:
        plain = statistics.median(self.plain_s)
        return [save + after - plain for save, after in zip(self.save_s, self.after_s)]


def measure(mode: str, prep: Path, work: Path, vocab: int, args: argparse.Namespace) -> Rounds:
    ds = read_ds_json(args.deepspeed)
    if mode == "async":
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "writer": ASYNC_WRITER}
    rank = int(os.environ.get("RANK", "0"))
    ds_path = work / f"{mode}-rank{rank}.json"  # one file a rank: no rank reads a file another is writing
    ds_path.write_text(json.dumps(ds))
    model = {
        "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 11 // 4,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.hidden // 64,
        "max_position_embeddings": 4096,
        "vocab_size": vocab,
    }
    settings = {
        "data.prep": str(prep),
        "run_dir": str(work / mode),
        "steps": "1000000",
        "deepspeed": str(ds_path),
        "model.config": json.dumps(model),
        "model.dtype": args.dtype,
        "batch.micro_batch": str(args.micro_batch),
        "optim.lr": "1e-4",
        "log.tensorboard": "false",
        "checkpoint.resume": "never",
        "checkpoint.keep_last": "2",
    }
    trainer = Trainer(load_train_config(None, [f"{k}={v}" for k, v in settings.items()]))

    def step() -> None:
        trainer.train_step()
        trainer.step += 1

    for _ in range(args.warmup):
        step()
    trainer.save()  # the first save sets up what later ones reuse (the writer's shared buffers)
    step()
    save_s, after_s, wait_s, plain_s = [], [], [], []
    for _ in range(args.repeats):
        save_s.append(clock(trainer.save))
        blocked = trainer.checkpoints.last_block_seconds or 0.0
        after_s.append(clock(step))
        wait_s.append((trainer.checkpoints.last_block_seconds or 0.0) - blocked)
        plain_s += [clock(step) for _ in range(args.plain)]
    trainer.checkpoints.commit(trainer.engine)
    latest = CheckpointDir.latest(checkpoint_root(work / mode))
    assert latest is not None and latest.is_complete(), f"{mode}: no complete checkpoint"
    size = sum(read_complete(latest.path)["files"].values())
    return Rounds(save_s, after_s, wait_s, plain_s, size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prep", help="data_prep output to train on (default: build the demo's)")
    p.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "zero3_cpu.json"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--hidden", type=int, default=512, help="Llama hidden size (intermediate 2.75x, heads of 64)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8, help="saves timed in each mode")
    p.add_argument("--plain", type=int, default=3, help="plain steps timed after each save's step")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    setup_logging(logging.WARNING)
    init_distributed()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    work, prep = workspace(args.prep)
    vocab = load_tokenizer(PrepDir(prep).read().tokenizer).vocab_size
    rounds = {mode: measure(mode, prep, work, vocab, args) for mode in ("sync", "async")}
    torch.distributed.barrier()
    if rank != 0:
        return
    shutil.rmtree(work, ignore_errors=True)
    sync_rounds = rounds["sync"]
    rate = sync_rounds.checkpoint_bytes / statistics.median(sync_rounds.save_s) / 1e9
    print(
        f"\n{world} rank(s) on {device_name()}, Llama hidden {args.hidden} x {args.layers} layers ({args.dtype}), "
        f"checkpoint {sync_rounds.checkpoint_bytes / 1e6:,.0f} MB ({rate:.2f} GB/s written by the synchronous "
        f"save); median ± std over {args.repeats} saves a mode, plain step the median of "
        f"{args.repeats * args.plain}"
    )
    columns = ("mode", "save call s", "step after s", "of which wait s", "plain step s", "block s")
    cells = {mode: (r.save_s, r.after_s, r.wait_s, r.plain_s, r.blocks()) for mode, r in rounds.items()}
    print(table(columns, [(mode, *(Samples(tuple(c)).show() for c in row)) for mode, row in cells.items()]))
    blocks = {mode: statistics.median(r.blocks()) for mode, r in rounds.items()}
    figures = {
        "save_block_async_vs_sync": blocks["async"] / blocks["sync"],
        "sync_block_s": blocks["sync"],
        "async_block_s": blocks["async"],
    }
    finish("checkpoint_save", figures, {mode: r._asdict() for mode, r in rounds.items()})


if __name__ == "__main__":
    main()
