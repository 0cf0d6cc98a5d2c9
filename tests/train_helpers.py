"""Helpers for the training tests: a small prep, configs, and runs under the real deepspeed launcher."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.checkpoint.files import CheckpointDir
from pipeline.launch import ROOT, deepspeed_command, launch_env

TINY_LLAMA = {
    "vocab_size": 768,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}

# Where the kernel tests (tests/test_tm_loss.py, test_linear_ce.py) put their tensors: the CPU, with Triton's
# interpreter; CPT_TEST_DEVICE=cuda runs them on a GPU, the Triton kernel compiled (conftest.py, gpu_checks.sh)
KERNEL_TEST_DEVICE = torch.device(os.environ.get("CPT_TEST_DEVICE", "cpu"))


def make_prep(
    sample,
    out: Path,
    tokenizer: Path | None = None,
    seq_len: int = 64,
    replay_len: int = 32,
    replay: bool = True,
    probe_docs: int = 0,
) -> Path:
    """Domain (stdlib code) + 15% general (stdlib docs), a 16-sample replay shard, 5% holdouts."""
    from data_prep.config import parse_config
    from data_prep.prepare import prepare

    cfg = parse_config(
        {
            "tokenizer": str(tokenizer or sample.tokenizer),
            "out": str(out),
            "seq_len": seq_len,
            "docs_per_chunk": 16,
            "sources": [
                {"name": "code", "role": "domain", "paths": [str(sample.domain)]},
                {"name": "docs", "role": "general", "paths": [str(sample.general)]},
            ],
            "mix": {"general_ratio": 0.15, "batch_rows": 4},
            "replay": {"num_samples": 16, "replay_len": replay_len, "probe_docs": probe_docs} if replay else None,
            "holdout": {"fraction": 0.05},
        },
        base=out.parent,
        origin="test",
    )
    prepare(cfg, quiet=True)
    return out


def write_config(path: Path, prep: Path, run_dir: Path, **sections: Any) -> Path:
    cfg: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": 12,
        "seed": 0,
        "deepspeed": str(ROOT / "ds_configs" / "zero3_cpu.json"),
        "model": {"config": TINY_LLAMA, "seed": 0},
        "data": {"prep": str(prep)},
        "optim": {"lr": 3e-3, "warmup_steps": 3, "decay": "cosine"},
        "batch": {"micro_batch": 2, "grad_accum": 1},
        "checkpoint": {"every": 2, "keep_last": 10},
        "eval": {"max_docs": 4},
        "log": {"tensorboard": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def launcher_command(config: Path, ranks: int = 2) -> list[str]:
    return deepspeed_command("pipeline.train", ["--config", str(config)], ranks, log_level="info")


def start_training(config: Path, output: bool = False) -> subprocess.Popen[str]:
    """A 2-rank training run in its own session, for a test to signal or kill (``os.killpg``); with
    ``output``, its stdout and stderr as one text pipe."""
    pipe = subprocess.PIPE if output else subprocess.DEVNULL
    return subprocess.Popen(
        launcher_command(config),
        env=env(),
        cwd=ROOT,
        stdout=pipe,
        stderr=subprocess.STDOUT if output else subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def env() -> dict[str, str]:
    return launch_env()


def run_training(config: Path, ranks: int = 2) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        launcher_command(config, ranks), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=900
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def metrics(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Logged values per step, lines merged in order (a resumed run appends, so its values win)."""
    out: dict[int, dict[str, Any]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], {}).update(row)
    return out


def final_weights(run_dir: Path) -> dict[str, Any]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    latest = CheckpointDir.latest_of_run(run_dir)
    return get_fp32_state_dict_from_zero_checkpoint(str(latest.root), tag=latest.tag)


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path: equal digests mean nothing changed."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def latest_checkpoint(run_dir: Path) -> Path:
    return CheckpointDir.latest_of_run(run_dir).path


def export_checkpoint(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline.export`` on ``checkpoint``, as a user runs it; the caller checks the result."""
    command = [sys.executable, "-m", "pipeline.export", "--checkpoint", str(checkpoint), "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
