"""Fill the DeepSpeed JSON from the pipeline config: one source of truth.

Batch sizes, precision and clipping come from the pipeline config and
overwrite whatever the JSON says; the optimizer's hyper-parameters too when
the JSON names a DeepSpeed optimizer (the offload config, for its CPU Adam);
otherwise ``pipeline.training.engine`` builds torch's fused AdamW, which needs no op
compiled on the nodes. The schedule is always ours.

ZeRO-3 bucket sizes given as ``"auto"`` follow the model's hidden size H, as
transformers' DeepSpeed integration sets them: reduce bucket H², prefetch
bucket 0.9·H², parameter persistence 10·H. DeepSpeed's own default reduce
bucket (5e8 elements) holds a 135M model's entire fp32 gradient at once;
with H² SmolLM2's rank peak is lower (docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpt_core.errors import UserError

from ..config import TrainConfig
from .ds_json import read_ds_json
from .precision import fill_ds_precision

AUTO_BUCKETS = {"reduce_bucket_size": 1.0, "stage3_prefetch_bucket_size": 0.9}  # × H²
AUTO_PERSISTENCE = 10  # × H


def filled_ds_config(cfg: TrainConfig, world: int, hidden_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for this run; ``hidden_size`` fills ``"auto"`` ZeRO bucket sizes."""
    path = Path(cfg.deepspeed)
    ds = read_ds_json(path)
    zero = ds.get("zero_optimization", {})
    for key, value in zero.items():
        if value == "auto":
            if hidden_size is None:
                raise UserError(f"{path}: zero_optimization.{key} is 'auto' but the model's hidden size is unknown")
            zero[key] = (
                int(AUTO_BUCKETS[key] * hidden_size**2)
                if key in AUTO_BUCKETS
                else AUTO_PERSISTENCE * hidden_size
                if key == "stage3_param_persistence_threshold"
                else _unknown_auto(path, key)
            )
    for key in ("scheduler", "train_batch_size"):
        ds.pop(key, None)
    ds["train_micro_batch_size_per_gpu"] = cfg.batch.micro_batch
    ds["gradient_accumulation_steps"] = cfg.batch.grad_accum
    ds["train_batch_size"] = cfg.batch.micro_batch * cfg.batch.grad_accum * world
    ds["gradient_clipping"] = cfg.optim.grad_clip
    fill_ds_precision(ds, cfg.model.dtype)
    if "optimizer" in ds:
        ds["optimizer"]["params"] = {
            **ds["optimizer"].get("params", {}),
            "lr": cfg.peak_lr,
            "betas": [cfg.optim.beta1, cfg.optim.beta2],
            "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay,
        }
    return ds


def _unknown_auto(path: Path, key: str) -> int:
    raise UserError(
        f"{path}: zero_optimization.{key} cannot be 'auto' (only {', '.join(AUTO_BUCKETS)} and "
        "stage3_param_persistence_threshold can)"
    )


def inference_ds_config(train_ds: dict[str, Any]) -> dict[str, Any]:
    """For a frozen teacher: same ZeRO stage and precision, no optimizer, no checkpoint writer processes."""
    ds = {k: v for k, v in train_ds.items() if k not in ("optimizer", "scheduler", "checkpoint")}
    ds["zero_optimization"] = {
        k: v for k, v in ds.get("zero_optimization", {}).items() if not k.startswith("offload_optimizer")
    }
    return ds
