"""The flags of the commands whose modules import torch, DeepSpeed or transformers, declared where nothing
heavy is imported: ``cpt COMMAND --help`` and a mistyped flag answer at once, before those imports.

Each module's ``main`` parses with the same parser, so the flags have one declaration; the description is
the module's docstring, read from its source without importing it.
"""

from __future__ import annotations

import argparse
import ast
from collections.abc import Callable
from pathlib import Path

from cpt_core.commands import prog

PACKAGE = Path(__file__).resolve().parent


def _parser(module: str) -> argparse.ArgumentParser:
    source = PACKAGE / (module.split(".", 1)[1].replace(".", "/") + ".py")
    return argparse.ArgumentParser(
        prog=prog(module),
        description=ast.get_docstring(ast.parse(source.read_text(encoding="utf-8"))),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def export_parser() -> argparse.ArgumentParser:
    p = _parser("pipeline.export")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint directory (RUN/checkpoints/stepNNNNNNNN)")
    which.add_argument("--run", help="a run directory: export its latest complete checkpoint")
    p.add_argument("--out", required=True, help="Hugging Face model directory to write")
    p.add_argument("--verify", action="store_true", help="compare logits with a DeepSpeed engine on the checkpoint")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    p.add_argument(
        "--adapter-out",
        metavar="NAME",
        help="adapter runs: also write the adapter alone in PEFT's format to OUT/NAME (PeftModel.from_pretrained)",
    )
    return p


def eval_parser() -> argparse.ArgumentParser:
    p = _parser("pipeline.eval")
    p.add_argument(
        "--model",
        required=True,
        help="tuned model: Hugging Face directory or a training checkpoint (RUN/checkpoints/stepNNNNNNNN)",
    )
    p.add_argument("--base", help="base model directory to compare with")
    p.add_argument("--prep", required=True, help="data_prep output (holdouts, replay shard)")
    p.add_argument("--cache", help="GeRe cache of the base model: adds replay TM and activation-state drift")
    p.add_argument("--max-docs", type=int, default=200, help="holdout documents per split (default: 200)")
    p.add_argument(
        "--mcq",
        nargs="+",
        metavar="FILE",
        help="multiple-choice question files (MMLU's CSV layout, or jsonl question/choices/answer): "
        "log-likelihood accuracy, base vs tuned",
    )
    p.add_argument("--out", help="write the result as JSON here")
    p.add_argument(
        "--timeout-minutes", type=float, default=30.0, help="how long a collective waits for the slowest rank"
    )
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def plan_parser() -> argparse.ArgumentParser:
    p = _parser("pipeline.plan")
    p.add_argument("--config", required=True, help="training config or run file (YAML)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--nodes", type=int, default=1, help="nodes (ranks = gpus × nodes; default: 1)")
    p.add_argument("--gpu-mem", type=float, help="GB per GPU (default: this machine's GPU, else no verdict)")
    p.add_argument("--disk-gbps", type=float, default=2.0, help="checkpoint write bandwidth, GB/s in all (default: 2)")
    p.add_argument("--cpu", action="store_true", help="plan for CPU ranks (fp32 where the config says auto)")
    return p


def gguf_parser() -> argparse.ArgumentParser:
    p = _parser("pipeline.gguf")
    p.add_argument("gguf", help="a .gguf file (any quantisation transformers can dequantise)")
    p.add_argument("--out", required=True, help="Hugging Face directory to write (model and tokenizer)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")
    return p


def demo_parser() -> argparse.ArgumentParser:
    p = _parser("pipeline.demo")
    p.add_argument("--out", default=None, help="demo directory (default runs/demo, or runs/demo-quick)")
    p.add_argument("--quick", action="store_true", help="a small corpus and few steps (~4 minutes; for CI)")
    p.add_argument("--ranks", type=int, default=2, help="training ranks (CPU processes; default: 2)")
    return p


def merge_parser() -> argparse.ArgumentParser:
    p = _parser("pipeline.merge")
    p.add_argument("--base", help="the base model directory (Hugging Face, safetensors)")
    p.add_argument("--tuned", help="the tuned model directory (an export of the run)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--alpha", type=float, help="share of the change to keep: 0 is the base, 1 the tuned model")
    how.add_argument(
        "--to-budget",
        type=float,
        metavar="RISE",
        help="the largest alpha whose general ppl rise on the prep's probe documents is at most RISE (e.g. 0.05)",
    )
    how.add_argument("--average-last", type=int, metavar="K", help="average the last K checkpoints of --run")
    p.add_argument("--prep", help="with --to-budget: the run's prep directory (its probe documents)")
    p.add_argument(
        "--first-window",
        action="store_true",
        help="with --to-budget: score each document's first seq_len tokens only (faster and noisier: CPU checks)",
    )
    p.add_argument("--run", help="with --average-last: the training run directory")
    p.add_argument("--out", required=True, help="Hugging Face model directory to write")
    return p


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "export": export_parser,
    "eval": eval_parser,
    "plan": plan_parser,
    "gguf": gguf_parser,
    "demo": demo_parser,
    "merge": merge_parser,
}
