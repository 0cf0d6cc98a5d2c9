"""``cpt init``: a commented run file for a model and corpora, which ``cpt run`` takes as it is.

The defaults are the method that held on both models measured (docs/choosing-a-method.md):
replay KL (w 1.5) to the frozen base on ~1000 general documents, no general mix, the
CPT learning-rate preset with warmup and cosine decay.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cpt_core.atomic import write_text
from cpt_core.errors import UserError, run_cli
from cpt_core.logs import setup_logging

from .launch import gpu_count

log = logging.getLogger(__name__)

TEMPLATE = """\
# Run file for `cpt run` (written by `cpt init`); paths are relative to this file.
#   cpt check {name}          every problem in the file, in seconds
#   cpt run {name} --smoke    the whole flow at toy size, into {run_dir}-smoke
#   cpt run {name}            the run; rerun it after a kill or an edit to redo only what changed
# Every key with its default: docs/config.md.
run_dir: {run_dir}
gpus: {gpus}                        # ranks on this node (CPU processes where there is no GPU)

model:
  path: {model}                     # Hugging Face checkpoint directory: model and tokenizer
  dtype: auto                       # bf16 on GPUs, fp32 on CPU
  gradient_checkpointing: {checkpointing}

data:                               # tokenize, pack, mix; the replay shard and holdouts are set apart first
  seq_len: {seq_len}
  sources:
{sources}
  mix: {{general_ratio: {general_ratio}, instruction_ratio: {instruction_ratio}}}   # token shares of the training rows
{replay_shard}  holdout: {{fraction: 0.01, max_docs: 200}}    # eval documents, never trained on or replayed

deepspeed: {preset}                 # zero3_bf16 (GPUs) | zero3_offload (CPU optimizer) | zero3_cpu | a JSON path
stage: cpt                          # lr preset: cpt 2e-5, sft 1e-6 (optim.lr sets it)
steps: 1000                         # or tokens: N
optim: {{warmup_ratio: 0.01, decay: cosine, min_lr_ratio: 0.1}}   # or decay: wsd (docs/choosing-a-method.md)
batch: {{micro_batch: 1, grad_accum: 8}}   # rows per step: micro_batch x grad_accum x gpus
{replay}
checkpoint: {{every: 200, keep_last: 2}}
log: {{every: 10}}
eval: {{every: 0, max_docs: 200}}   # perplexity on the holdouts; base against tuned in export/report.md
export: {{verify: true}}
"""

REPLAY_KL = """\
# Anti-forgetting: KL to the frozen base model on the replay rows, no CE on them (the default:
# docs/choosing-a-method.md). GeRe's TM loss instead: {strategy: tm, weight: 1.0}.
replay: {strategy: kl, weight: 1.5, ce_weight: 0.0, samples_per_step: %d}
"""

NO_REPLAY = """\
# No general corpus was given, so nothing holds general ability: add one under data.sources (role: general)
# and a replay section (cpt init --general PATH writes both).
replay: {strategy: none}
"""


def render(
    out: Path,
    model: Path,
    domain: list[str],
    general: list[str],
    instruction: list[str],
    gpus: int | None = None,
    run_dir: str | None = None,
) -> str:
    config = model / "config.json"
    if not config.is_file():
        raise UserError(f"--model {model}: not a Hugging Face model directory (no config.json)")
    if not domain:
        raise UserError("--domain: give at least one domain corpus (files, directories or globs)")
    found = gpu_count()
    gpus = gpus or found or 2
    positions = json.loads(config.read_text()).get("max_position_embeddings") or 2048
    base = out.parent.resolve()

    def rel(p: str | Path) -> str:
        """Relative to the run file where it lies beside or below it, else absolute."""
        path = Path(p).resolve()
        return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)

    sources = [
        ("domain", "domain", domain),
        ("general", "general", general),
        ("instruction", "instruction", instruction),
    ]
    lines = [
        f"    - {{name: {name}, role: {role}, paths: {json.dumps([rel(p) for p in paths])}}}"
        for name, role, paths in sources
        if paths
    ]
    replay_shard = "  replay: {num_samples: 1000, replay_len: 512}   # GeRe replay shard of general documents\n"
    text = TEMPLATE.format(
        name=out.name,
        run_dir=run_dir or f"runs/{model.name}-cpt",
        gpus=gpus,
        model=rel(model),
        checkpointing="true" if found else "false",
        seq_len=min(int(positions), 2048),
        sources="\n".join(lines),
        general_ratio=0.0,
        instruction_ratio=0.1 if instruction else 0.0,
        replay_shard=replay_shard if general else "",
        preset="zero3_bf16" if found else "zero3_cpu",
        replay=REPLAY_KL % (2 * gpus) if general else NO_REPLAY,
    )
    return "\n".join(_align_comment(line) for line in text.splitlines()) + "\n"


def _align_comment(line: str, column: int = 40) -> str:
    """Trailing comments start in one column where the value leaves room."""
    code, sep, comment = line.partition("  # ")
    if not sep or not code.strip() or code.lstrip().startswith("#"):
        return line
    return f"{code.rstrip():<{column - 2}}  # {comment.strip()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Write a commented run file for a model and corpora; `cpt run` takes it as it is.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model directory")
    p.add_argument("--domain", nargs="+", required=True, help="domain corpora: files, directories or globs")
    p.add_argument("--general", nargs="*", default=[], help="general corpora (replay shard, holdout, mix)")
    p.add_argument("--instruction", nargs="*", default=[], help="instruction data mixed into the same run")
    p.add_argument("--gpus", type=int, help="ranks on this node (default: the GPUs nvidia-smi lists, else 2)")
    p.add_argument("--run-dir", help="output directory of the run (default: runs/MODEL-cpt)")
    p.add_argument("--out", type=Path, default=Path("run.yaml"), help="the run file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing run file")
    args = p.parse_args(argv)
    setup_logging()

    def body() -> None:
        if args.out.exists() and not args.force:
            raise UserError(f"{args.out} exists; --force overwrites it")
        text = render(args.out, args.model, args.domain, args.general, args.instruction, args.gpus, args.run_dir)
        write_text(args.out, text)
        log.info("wrote %s; next: cpt check %s, then cpt run %s --smoke", args.out, args.out, args.out)

    return run_cli(body, log)


if __name__ == "__main__":
    sys.exit(main())
