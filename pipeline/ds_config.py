"""Fill the DeepSpeed JSON from the pipeline config: one source of truth.

Batch sizes, precision and clipping come from the pipeline config and
overwrite whatever the JSON says; the optimizer's hyper-parameters too when
the JSON names a DeepSpeed optimizer (GPU configs use its fused Adam);
otherwise the trainer builds torch AdamW. The schedule is always ours.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .config import TrainConfig


def filled_ds_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise ValueError(f"deepspeed: config file {path} not found (see ds_configs/)")
    ds = json.loads(path.read_text())
    ds = copy.deepcopy(ds)
    for key in ("scheduler", "train_batch_size"):
        ds.pop(key, None)
    ds["train_micro_batch_size_per_gpu"] = cfg.batch.micro_batch
    ds["gradient_accumulation_steps"] = cfg.batch.grad_accum
    ds["train_batch_size"] = cfg.batch.micro_batch * cfg.batch.grad_accum * world
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.model.dtype == "bfloat16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.model.dtype == "float16"}
    if "optimizer" in ds:
        ds["optimizer"]["params"] = {**ds["optimizer"].get("params", {}), "lr": cfg.peak_lr,
                                     "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": cfg.optim.eps,
                                     "weight_decay": cfg.optim.weight_decay}
    return ds


def inference_ds_config(train_ds: dict[str, Any]) -> dict[str, Any]:
    """For a frozen teacher: same ZeRO stage and precision, no optimizer."""
    ds = {k: v for k, v in train_ds.items() if k not in ("optimizer", "scheduler")}
    ds["zero_optimization"] = {k: v for k, v in ds.get("zero_optimization", {}).items()
                               if not k.startswith("offload_optimizer")}
    return ds
