"""The whole pipeline on the embedded default, on CPU: ``cpt demo [--quick]``.

1. corpora from text that ships with Python (stdlib code = domain, its docs = general) and a
   SentencePiece tokenizer trained on them;
2. a base model: a tiny Llama pretrained from scratch on the general text alone, so that it has
   something to forget (2 ZeRO-3 ranks under the deepspeed launcher; exported, and cached for reruns);
3. ``cpt run RUN/run.yaml``, the run file a user would write: data prep with a replay shard and
   holdouts, continued pretraining with replay KL (the default) on 2 ZeRO-3 ranks, export, and the
   report card base vs tuned (``RUN/export/report.md``), printed at the end.
Each step is skipped when its output is current, so a rerun is quick.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cpt_core.errors import UserError, run_cli
from cpt_core.logs import setup_logging
from data_prep.config import load_config
from data_prep.demo import demo_config, write_demo_inputs
from data_prep.prepare import prepare
from data_prep.tokenizer import load_tokenizer

from .cli_args import demo_parser
from .evaluation.report import markdown_table
from .launch import ROOT, deepspeed_command
from .run import Runner
from .runfile import load_run

log = logging.getLogger("pipeline.demo")

MODEL = {
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
FULL = {"base_steps": 300, "cpt_steps": 120, "small": False, "eval_docs": 100}
QUICK = {"base_steps": 60, "cpt_steps": 16, "small": True, "eval_docs": 24}


class DemoStepFailed(UserError):
    """A step of the demo exited non-zero; its own output above says why."""


def run_demo(out: Path, quick: bool, ranks: int = 2) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    step("1/3 sample corpora from Python's own text, and a tokenizer trained on them")
    tokenizer = write_demo_inputs(out, small=plan["small"])
    base_hf = out / "base" / "hf"
    if not (base_hf / "config.json").is_file():
        step(f"2/3 base model: pretrain a tiny Llama on general text for {plan['base_steps']} steps")
        base_prep = _general_only_prep(out, plan["small"])
        config = _write(
            out / "base.yaml",
            {
                "run_dir": str(out / "base"),
                "stage": "cpt",
                "steps": plan["base_steps"],
                "seed": 0,
                "deepspeed": str(ROOT / "ds_configs" / "zero3_cpu.json"),
                "model": {"config": {**MODEL, "vocab_size": load_tokenizer(tokenizer).vocab_size}, "seed": 0},
                "data": {"prep": str(base_prep)},
                "optim": {"lr": 3e-3, "warmup_steps": 10, "min_lr_ratio": 0.1},
                "batch": {"micro_batch": 4, "grad_accum": 1},
                "checkpoint": {"every": 100, "keep_last": 1},
                "eval": {"max_docs": plan["eval_docs"]},
            },
        )
        _launch(config, ranks)
        _export(out / "base", base_hf)
    else:
        step("2/3 base model: cached at " + str(base_hf))
    run_file = _write(out / "run.yaml", demo_run_file(plan, ranks))
    step(f"3/3 cpt run {run_file}: prep, {plan['cpt_steps']} steps of CPT with replay KL, export, report")
    report = Runner(load_run(run_file)).execute()
    result = json.loads((report.parent / "eval.json").read_text())
    print("\n" + markdown_table(result) + f"\n\nreport: {report} ({time.perf_counter() - started:.0f} s in all)")
    return result


def demo_run_file(plan: dict[str, Any], ranks: int) -> dict[str, Any]:
    """The run file of the demo's continued pretraining: the default method on the sample corpora."""
    data = {k: v for k, v in demo_config(small=plan["small"], workers=2).items() if k != "out"}
    data["mix"] = {**data["mix"], "general_ratio": 0.0}  # replay KL holds general ability without a general mix
    return {
        "run_dir": ".",
        "gpus": ranks,
        "model": {"path": "base/hf"},
        "data": data,
        "deepspeed": "zero3_cpu",
        "stage": "cpt",
        "steps": plan["cpt_steps"],
        "seed": 0,
        "optim": {"lr": 1e-3, "warmup_steps": 5, "min_lr_ratio": 0.1, "decay": "cosine"},
        "batch": {"micro_batch": 2, "grad_accum": 2},
        "replay": {"strategy": "kl", "weight": 1.5, "ce_weight": 0.0, "samples_per_step": 4},
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 10},
        "eval": {"every": max(plan["cpt_steps"] // 4, 1), "max_docs": plan["eval_docs"]},
        "export": {"verify": False},
    }


def step(text: str) -> None:
    log.info("── %s", text)


def _general_only_prep(out: Path, small: bool) -> Path:
    """The general corpus as the whole mixture; holdout chosen by the same seeded hash as the demo's."""
    cfg = demo_config(small=small, workers=2)
    general = next(s for s in cfg["sources"] if s["role"] == "general")
    cfg.update(
        out="base_prep",
        sources=[{**general, "name": "python_docs_only", "role": "domain"}],
        mix={"general_ratio": 0.0},
        replay=None,
    )
    path = _write(out / "base_prep.yaml", cfg)
    prepare(load_config(path), quiet=True)
    return out / "base_prep"


def _write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _launch(config: Path, ranks: int) -> None:
    _run(deepspeed_command("pipeline.train", ["--config", str(config)], ranks))


def _export(run: Path, out: Path) -> None:
    _run([sys.executable, "-m", "pipeline.export", "--run", str(run), "--out", str(out)])


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        raise DemoStepFailed(f"demo: step failed ({result.returncode}): {' '.join(cmd)}")


def main(argv: list[str] | None = None) -> int:
    args = demo_parser().parse_args(argv)
    setup_logging(brief=True)
    logging.getLogger("data_prep").setLevel(logging.WARNING)
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo")).resolve()
    return run_cli(lambda: run_demo(out, args.quick, args.ranks), log)


if __name__ == "__main__":
    sys.exit(main())
