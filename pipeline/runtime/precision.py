"""Training precision, decided in one place: the model's dtype, the DeepSpeed precision block, TF32.

``model.dtype: auto`` (the default) resolves to what the DeepSpeed JSON asks
for (``bf16.enabled: true`` → bfloat16, ``fp16.enabled: true`` → float16),
else bfloat16 where CUDA is available and float32 elsewhere (CPU bf16 matmuls
are slow and the CPU tests compare fp32 numbers). An explicit ``model.dtype``
that contradicts an explicit ``enabled: true`` in the JSON is an error rather
than a silent choice of one of them. The resolved dtype is written into the
run's config, so a checkpoint, its export and its GeRe cache agree on it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cpt_core.errors import UserError

from ..config import TrainConfig
from .ds_json import read_ds_json

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
DS_BLOCK = {"bfloat16": "bf16", "float16": "fp16"}


def requested_by_ds_json(ds: dict[str, Any]) -> str | None:
    """The dtype an explicit ``enabled: true`` in the DeepSpeed JSON asks for, or None."""
    asked = [dtype for dtype, block in DS_BLOCK.items() if ds.get(block, {}).get("enabled") is True]
    if len(asked) > 1:
        raise UserError("deepspeed: the JSON enables both bf16 and fp16; enable at most one")
    return asked[0] if asked else None


def resolve_dtype(model_dtype: str, ds_json: str | Path, cuda: bool | None = None) -> str:
    """The concrete training dtype for ``model.dtype`` (possibly ``auto``) and the DeepSpeed JSON."""
    if model_dtype not in (*DTYPES, "auto"):
        raise UserError(f"model.dtype must be one of auto, {', '.join(DTYPES)}, got {model_dtype!r}")
    path = Path(ds_json)
    asked = requested_by_ds_json(read_ds_json(path))
    if model_dtype != "auto":
        if asked is not None and asked != model_dtype:
            raise UserError(
                f"model.dtype is {model_dtype} but {path} enables {DS_BLOCK[asked]}; "
                "set model.dtype: auto, or make the two agree"
            )
        return model_dtype
    if asked is not None:
        return asked
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "bfloat16" if cuda else "float32"


def fill_ds_precision(ds: dict[str, Any], dtype: str) -> None:
    """Set the DeepSpeed JSON's bf16/fp16 blocks from the resolved dtype (the JSON's own value is replaced)."""
    for name, block in DS_BLOCK.items():
        ds[block] = {**ds.get(block, {}), "enabled": dtype == name}


def enable_tf32() -> None:
    """fp32 matmuls and convolutions on CUDA use TF32 tensor cores (bf16 runs still do fp32 reductions)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_precision(cfg: TrainConfig) -> None:
    """Replace ``model.dtype: auto`` in ``cfg`` by the concrete dtype, and log the choice."""
    requested = cfg.model.dtype
    cfg.model.dtype = resolve_dtype(requested, cfg.deepspeed)
    log.info("precision: %s (model.dtype: %s, %s)", cfg.model.dtype, requested, Path(cfg.deepspeed).name)
