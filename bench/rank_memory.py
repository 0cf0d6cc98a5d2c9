"""Peak host memory of a training rank on a real model: where it goes, and what each fix saves.

Runs the same short CPT job (SmolLM2-135M, seq_len 64, micro_batch 2, TM
replay with 2 rows a step, 3 steps) on 2 ZeRO-3 CPU ranks under the deepspeed
launcher, once per row, and samples every rank's VmHWM (peak resident set):
  1. DeepSpeed's default ZeRO-3 buckets (reduce bucket 5e8 elements) and
     glibc's default malloc thresholds: how it was;
  2. buckets sized from the hidden size ("auto" in ds_configs/zero3_cpu.json);
  3. + large freed blocks returned to the OS (pipeline/runtime/host_memory.py): today.
The model-state share is what a rank must hold: 20 bytes/param in fp32
(weights 4, DeepSpeed's fp32 partition 4, gradient 4, Adam 8) over the ranks.
The baseline is a rank's resident size before the model loads (interpreter,
torch, DeepSpeed, transformers).

    python -m bench.rank_memory [--model DIR] [--steps 3]
tok/s is the mean of steps 2.. (one run each: a few percent of noise).
Last line: peak_rss_gb=<today> peak_vs_before=<today/row 1> model_states_gb=<share> baseline_gb=<b>
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from safetensors import safe_open

from bench.harness import finish, table, timed
from data_prep.config import parse_config
from data_prep.prep_dir import PrepDir
from data_prep.prepare import prepare
from data_prep.sample import SMALL, write_sample_corpora
from pipeline.gere.build import build_gere_cache
from pipeline.launch import ROOT, run_deepspeed
from pipeline.real_models import materialise
from pipeline.runtime.model import ModelSource


def make_prep(model: Path, out: Path) -> Path:
    corpora = write_sample_corpora(out / "corpora", SMALL)
    cfg = parse_config(
        {
            "tokenizer": str(model),
            "out": str(out / "prep"),
            "seq_len": 64,
            "docs_per_chunk": 64,
            "sources": [
                {"name": "code", "role": "domain", "paths": [str(corpora["domain"])]},
                {"name": "docs", "role": "general", "paths": [str(corpora["general"])]},
            ],
            "mix": {"general_ratio": 0.15, "batch_rows": 4},
            "replay": {"num_samples": 16, "replay_len": 32},
            "holdout": {"fraction": 0.05},
        },
        base=out,
        origin="bench",
    )
    prepare(cfg, quiet=True)
    return out / "prep"


def sample_peak(stop: threading.Event, peaks: dict[tuple[int, str], int]) -> None:
    """VmHWM (kB) of the training ranks, sampled until ``stop``."""
    while not stop.is_set():
        out = subprocess.run(["pgrep", "-f", "pipeline.train --local_rank"], capture_output=True, text=True)
        for pid in map(int, out.stdout.split()):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith(("VmHWM", "VmRSS")):
                    key = (pid, line.split(":")[0])
                    peaks[key] = max(peaks.get(key, 0), int(line.split()[1]))
        time.sleep(0.2)


def run(config: Path, env: dict[str, str]) -> tuple[float, float]:
    """(peak VmHWM over ranks in GB, seconds); ``env`` adds to the launch environment."""
    peaks: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=sample_peak, args=(stop, peaks), daemon=True)
    watcher.start()
    seconds, result = timed(lambda: run_deepspeed("pipeline.train", ["--config", str(config)], capture=True, env=env))
    stop.set()
    watcher.join()
    if result.returncode != 0:
        raise SystemExit(result.stdout[-2000:] + result.stderr[-2000:])
    hwm = [v for (pid, key), v in peaks.items() if key == "VmHWM"]
    return max(hwm) / 1e6, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="HF model dir (default: SmolLM2-135M from pipeline.real_models)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    model = args.model or materialise("smollm2")
    n_params = 0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            n_params += sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
    with tempfile.TemporaryDirectory(prefix="bench-rank-memory-") as tmp:
        root = Path(tmp)
        prep = make_prep(model, root)
        build_gere_cache(ModelSource(path=str(model)), PrepDir(prep).replay, root / "cache")
        ds_default = json.loads((ROOT / "ds_configs" / "zero3_cpu.json").read_text())
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size"):
            ds_default["zero_optimization"].pop(key)  # DeepSpeed's own defaults
        (root / "ds_default.json").write_text(json.dumps(ds_default))
        rows = []
        for name, ds, malloc_defaults in (
            ("DeepSpeed default buckets, glibc defaults", root / "ds_default.json", "1"),
            ("buckets from hidden size", ROOT / "ds_configs" / "zero3_cpu.json", "1"),
            ("+ freed memory returned to the OS", ROOT / "ds_configs" / "zero3_cpu.json", "0"),
        ):
            config = root / f"cpt{len(rows)}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "run_dir": str(root / f"run{len(rows)}"),
                        "steps": args.steps,
                        "deepspeed": str(ds),
                        "model": {"path": str(model)},
                        "data": {"prep": str(prep)},
                        "optim": {"lr": 1e-4, "warmup_steps": 1},
                        "batch": {"micro_batch": 2},
                        "replay": {"strategy": "tm", "cache": str(root / "cache"), "samples_per_step": 2},
                        "eval": {"max_docs": 2},
                        "log": {"tensorboard": False},
                    }
                )
            )
            peak, seconds = run(config, {"CPT_MALLOC_DEFAULTS": malloc_defaults})
            logged = [json.loads(line) for line in (root / f"run{len(rows)}" / "metrics.jsonl").open()]
            losses = [r.get("loss") for r in logged]
            tok_s = [r["tok_s"] for r in logged if "tok_s" in r and r["step"] > 1]  # step 1 carries warm-up
            rows.append((name, peak, seconds, losses, sum(tok_s) / len(tok_s)))
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, deepspeed, transformers, datasets; "
            "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    baseline = int(probe.stdout.strip().splitlines()[-1]) / 1e6
    states = n_params * 20 / 2 / 1e9
    print(
        f"\n{model.name}: {n_params / 1e6:.0f}M params, 2 ZeRO-3 CPU ranks, fp32, seq_len 64, micro_batch 2, "
        f"TM replay 2 rows/step, {args.steps} steps; peak VmHWM of the larger rank"
    )
    print(
        f"model states per rank (20 B/param / 2): {states:.2f} GB; a rank before loading the model: {baseline:.2f} GB"
    )
    cells = [
        (
            name,
            f"{peak:.2f}",
            f"{peak / rows[0][1]:.2f}",
            f"{(peak - baseline) / states:.2f}",
            f"{tok_s:.1f}",
            f"{s:.0f}",
        )
        for name, peak, s, _, tok_s in rows
    ]
    print(table(("configuration", "peak GB", "vs first", "over baseline / states", "tok/s", "run s"), cells))
    same = all(r[3] == rows[0][3] for r in rows)
    print(f"losses identical across rows: {same}")
    figures = {
        "peak_rss_gb": rows[-1][1],
        "peak_vs_before": rows[-1][1] / rows[0][1],
        "model_states_gb": states,
        "baseline_gb": baseline,
    }
    finish("rank_memory", figures, {"rows": [r[:3] + r[4:] for r in rows], "losses_identical": same})


if __name__ == "__main__":
    main()
