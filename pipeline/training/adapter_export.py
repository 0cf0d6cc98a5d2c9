"""An adapter run's weights for export: the base merged with its LoRA update, one tensor at a time.

An adapter checkpoint holds the trained tensors alone (``lora_A``/``lora_B`` and
the trained copies of ``modules_to_save``); the frozen ones are the base's
safetensors files (or, for a from-scratch base, its seed). The merged weight
of an adapted linear layer is ``W + (alpha / r) · B @ A``, LoRA's own
definition (PEFT's ``merge_and_unload`` is the reference a test compares with),
computed in fp32 and written in the run's dtype. Each merged tensor is made
when the export's writer asks for it, so no process holds the whole model.
The adapter alone is also written in PEFT's own format (``PeftModel.from_pretrained``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from cpt_core.errors import UserError

from ..runtime.model import ModelSource, load_causal_lm
from .adapter import ADAPTER_NAME, lora_config

TRAINED_COPY = f".modules_to_save.{ADAPTER_NAME}."
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class LazyTensor:
    """A tensor made on demand (``contiguous()``), with its shape and dtype known before: what the export's
    shard writer takes, like DeepSpeed's lazy view of ZeRO-3 partitions."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, make: Callable[[], torch.Tensor]) -> None:
        self.shape, self.dtype, self._make = torch.Size(shape), dtype, make

    def contiguous(self) -> torch.Tensor:
        return self._make().contiguous()


def base_tensors(cfg: dict[str, Any]) -> dict[str, LazyTensor]:
    """The frozen weights the run's adapters sat on, by name: read from the start checkpoint's safetensors files
    one tensor at a time, or, for a from-scratch base (small by nature), built from its seed."""
    model = cfg["model"]
    path = cfg.get("init_from") or model["path"]
    if path is None:
        source = ModelSource(config=model["config"], seed=model["seed"], dtype=model["dtype"])
        state = load_causal_lm(source).state_dict()
        return {k: LazyTensor(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in state.items()}
    out: dict[str, LazyTensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                dtype = SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.float32)
                out[key] = LazyTensor(tuple(piece.get_shape()), dtype, lambda file=file, key=key: _read(file, key))
    return out


def _read(file: Path, key: str) -> torch.Tensor:
    with safe_open(str(file), "pt") as f:
        return f.get_tensor(key)


def merged_tensors(
    base: Mapping[str, LazyTensor], trained: Mapping[str, Any], adapter: dict[str, Any], origin: str
) -> dict[str, LazyTensor]:
    """``base`` with each adapted weight merged and each trained copy in place of its module's tensor.

    ``trained``: the checkpoint's trained tensors by name, as the adapted model names them
    (``X.lora_A.default.weight``, ``X.modules_to_save.default.weight``). A trained tensor that finds no base
    weight is an error naming it (``origin``: the checkpoint), so nothing trained is silently dropped.
    """
    scaling = adapter["alpha"] / adapter["r"]
    used: set[str] = set()
    out: dict[str, LazyTensor] = {}
    for name, tensor in base.items():
        module, _, leaf = name.rpartition(".")
        copy = f"{module}{TRAINED_COPY}{leaf}"
        a, b = f"{module}.lora_A.{ADAPTER_NAME}.weight", f"{module}.lora_B.{ADAPTER_NAME}.weight"
        if copy in trained:
            used.add(copy)
            out[name] = LazyTensor(tuple(tensor.shape), torch.float32, lambda c=trained[copy]: c.contiguous())
        elif leaf == "weight" and a in trained:
            used.update((a, b))
            out[name] = LazyTensor(
                tuple(tensor.shape),
                torch.float32,
                lambda w=tensor, a=trained[a], b=trained[b]: (
                    w.contiguous().float() + scaling * (b.contiguous().float() @ a.contiguous().float())
                ),
            )
        else:
            out[name] = tensor
    unused = sorted(set(trained) - used)
    if unused:
        raise UserError(f"{origin}: trained tensors with no base weight to merge into, e.g. {unused[:3]}")
    return out


def write_peft_adapter(
    trained: Mapping[str, Any], config: Any, cfg: dict[str, Any], dtype: torch.dtype, out: Path
) -> None:
    """The adapter alone, as ``PeftModel.save_pretrained`` writes it (adapter_config.json,
    adapter_model.safetensors): PEFT's own writer on a skeleton of the model on the meta device."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = get_peft_model(AutoModelForCausalLM.from_config(config), lora_config(cfg["adapter"]))
    base_path = cfg.get("init_from") or cfg["model"]["path"]
    skeleton.peft_config[ADAPTER_NAME].base_model_name_or_path = base_path
    state = {f"base_model.model.{k}": v.contiguous().to(dtype) for k, v in trained.items()}
    skeleton.save_pretrained(str(out), state_dict=state, save_embedding_layers=False)
