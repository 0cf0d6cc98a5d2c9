"""Forgetting benchmark: which anti-forgetting option keeps general ability while learning the domain.

The small-scale analog of the GeRe paper's table. Every row continues the
same base model (the demo's: a tiny Llama pretrained on Python's English
docs) on the same domain data (stdlib code) for the same steps and lr, as a
real 2-rank ZeRO-3 run, then is evaluated on the same general and domain
holdouts. Rows: naive CPT (no general mix, no replay); + 15% general mix;
+ GeRe replay CE only; + GeRe TM; + KD; + L2-SP; + EWC; and naive and
mix + TM again at 3x and 10x the lr.

    python -m pipeline.demo            # once: builds runs/demo (prep, base model, GeRe cache)
    python -m bench.forgetting [--steps 60]
Last line: tm_forgetting_vs_naive=<x> tm_learning_vs_naive=<y> (goal x <= 0.25, y >= 0.95)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from data_prep.mix import mix
from pipeline.checkpoint_files import CheckpointDir
from pipeline.eval import evaluate_model, load_hf
from pipeline.launch import ROOT, run_deepspeed

VARIANTS: list[tuple[str, bool, dict[str, Any], float]] = [  # name, general mix, extra config, lr multiplier
    ("naive CPT", False, {}, 1.0),
    ("+ 15% general mix", True, {}, 1.0),
    ("+ mix + GeRe replay CE", True, {"replay": {"strategy": "ce", "samples_per_step": 4}}, 1.0),
    ("+ mix + GeRe TM", True, {"replay": {"strategy": "tm", "samples_per_step": 4, "weight": 1.0}}, 1.0),
    (
        "+ mix + GeRe TM (dynamic w)",
        True,
        {"replay": {"strategy": "tm", "samples_per_step": 4, "weight": "dynamic"}},
        1.0,
    ),
    ("+ mix + KD", True, {"kd": {"weight": 1.0}}, 1.0),
    ("+ mix + L2-SP", True, {"penalty": {"kind": "l2sp", "weight": 50.0}}, 1.0),
    ("+ mix + EWC", True, {"penalty": {"kind": "ewc", "weight": 50.0}}, 1.0),
    ("naive CPT, 3x lr", False, {}, 3.0),
    ("+ mix + GeRe TM, 3x lr", True, {"replay": {"strategy": "tm", "samples_per_step": 4, "weight": 1.0}}, 3.0),
    ("naive CPT, 10x lr", False, {}, 10.0),
    ("+ mix + GeRe TM, 10x lr", True, {"replay": {"strategy": "tm", "samples_per_step": 4, "weight": 1.0}}, 10.0),
]


def no_mix_prep(demo: Path) -> Path:
    """The demo's prep with a 0% general mixture: same builds, replay shard and holdouts."""
    out = demo / "prep_nomix"
    if not (out / "prep.json").is_file():
        prep = json.loads((demo / "prep" / "prep.json").read_text())
        domain = [d for d in prep["builds"].values() if "/domain/" in d]
        mix(domain, out / "mixture", general_ratio=0.0, quiet=True)
        (out / "prep.json").write_text(json.dumps({**prep, "mixture": str(out / "mixture")}, indent=1))
    return out


def run_variant(
    name: str, prep: Path, extra: dict[str, Any], lr: float, args: argparse.Namespace, demo: Path, out: Path
) -> float:
    cfg: dict[str, Any] = {
        "run_dir": str(out),
        "stage": "cpt",
        "steps": args.steps,
        "seed": 0,
        "deepspeed": str(ROOT / "ds_configs" / "zero3_cpu.json"),
        "model": {"path": str(demo / "base" / "hf")},
        "data": {"prep": str(prep)},
        "optim": {"lr": lr, "warmup_steps": 5, "min_lr_ratio": 0.1},
        "batch": {"micro_batch": 2, "grad_accum": 2},
        "checkpoint": {"every": 0, "keep_last": 1, "resume": "never"},
        "eval": {"max_docs": 8},
        "log": {"tensorboard": False},
    }
    for key, value in extra.items():
        cfg[key] = {**value, **({"cache": str(demo / "gere_cache")} if key == "replay" else {})}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.perf_counter()
    result = run_deepspeed("pipeline.train", ["--config", str(out / "config.yaml")], capture=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{name}: training failed\n{result.stderr[-3000:]}")
    latest = CheckpointDir.latest_of_run(out)
    subprocess.run(
        [sys.executable, "-m", "pipeline.export", "--checkpoint", str(latest.path), "--out", str(out / "hf")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="output of `python -m pipeline.demo`")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3, help="the 1x learning rate")
    p.add_argument("--eval-docs", type=int, default=100)
    p.add_argument("--only", nargs="*", help="run only variants whose name contains one of these")
    args = p.parse_args()
    demo = Path(args.demo).resolve()
    if not (demo / "base" / "hf" / "config.json").is_file() or not (demo / "gere_cache" / "meta.json").is_file():
        raise SystemExit(f"{demo}: run `python -m pipeline.demo` first (it builds the base model and GeRe cache)")
    preps = {True: demo / "prep", False: no_mix_prep(demo)}
    base = evaluate_model(load_hf(demo / "base" / "hf"), preps[True], args.eval_docs)
    rows = [("base", base, 0.0)]
    for i, (name, mixed, extra, mult) in enumerate(VARIANTS):
        if args.only and not any(o in name for o in args.only):
            continue
        out = demo / "forgetting" / f"{i:02d}"
        seconds = run_variant(name, preps[mixed], extra, args.lr * mult, args, demo, out)
        rows.append((name, evaluate_model(load_hf(out / "hf"), preps[True], args.eval_docs), seconds))
        print(f"  done: {name} ({seconds:.0f} s)", flush=True)
    g0, d0 = base["ppl/general"], base["ppl/domain"]
    print(
        f"\n{args.steps} steps of 4 x 512 tokens from the demo base, lr {args.lr:g} (1x), 2 CPU ranks; "
        f"holdouts: {args.eval_docs} docs per split"
    )
    print(
        f"| {'run':<30} | {'general ppl':>11} | {'Δ general':>9} | {'domain ppl':>10} | {'Δ domain':>8} "
        f"| {'wall s':>6} |"
    )
    print(f"|{'-' * 32}|{'-' * 13}|{'-' * 11}|{'-' * 12}|{'-' * 10}|{'-' * 8}|")
    for name, r, s in rows:
        g, d = r["ppl/general"], r["ppl/domain"]
        print(f"| {name:<30} | {g:>11.2f} | {g / g0 - 1:>+9.1%} | {d:>10.2f} | {d / d0 - 1:>+8.1%} | {s:>6.0f} |")
    by = {name: r for name, r, _ in rows}
    summary = []
    for suffix in ("", ", 3x lr", ", 10x lr"):
        naive, tm = by.get(f"naive CPT{suffix}"), by.get(f"+ mix + GeRe TM{suffix}")
        if naive and tm:
            forget = (
                (tm["ppl/general"] - g0) / (naive["ppl/general"] - g0) if naive["ppl/general"] != g0 else float("nan")
            )
            learn = (d0 - tm["ppl/domain"]) / (d0 - naive["ppl/domain"]) if naive["ppl/domain"] != d0 else float("nan")
            tag = suffix.strip(", ").replace(" ", "_") or "1x"
            print(
                f"{tag}: TM's general-ppl rise is {forget:.2f} of naive's; its domain-ppl gain {learn:.2f} of naive's"
            )
            if not summary:
                summary = [f"tm_forgetting_vs_naive={forget:.3f}", f"tm_learning_vs_naive={learn:.3f}"]
    print(" ".join(summary))


if __name__ == "__main__":
    main()
