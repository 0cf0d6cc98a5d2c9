"""L2-SP: a decoupled pull of the weights toward their initial values, on each rank's own partition.

After every optimizer step, p ← p − lr·λ·(p − p₀). Under ZeRO-3 each rank
holds 1/N of every parameter: the pull reads and writes only that local fp32
partition through DeepSpeed's public ``safe_get/set_local_fp32_param`` and the
local working copy (``ds_tensor``) the next forward gathers, so no rank ever
materialises the full weights and the anchor costs 4 bytes per local element.
"""
from __future__ import annotations

import torch


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def local_fp32(p: torch.nn.Parameter) -> torch.Tensor:
    if _is_zero3(p):
        from deepspeed.utils import safe_get_local_fp32_param

        return safe_get_local_fp32_param(p)
    return p.data.float()


def set_local_fp32(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    if _is_zero3(p):
        from deepspeed.utils import safe_set_local_fp32_param

        safe_set_local_fp32_param(p, value)  # the optimizer's fp32 master partition
        p.ds_tensor.data.copy_(value.reshape(p.ds_tensor.shape).to(p.ds_tensor.dtype))  # what forward gathers
    else:
        p.data.copy_(value.to(p.dtype))


class L2SPPull:
    def __init__(self, params: list[torch.nn.Parameter], weight: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.weight = weight
        self.anchor = [local_fp32(p).detach().clone() for p in self.params]

    def apply(self, lr: float) -> None:
        factor = min(lr * self.weight, 1.0)  # never overshoot past the anchor
        with torch.no_grad():
            for p, p0 in zip(self.params, self.anchor):
                local = local_fp32(p)
                set_local_fp32(p, local - factor * (local - p0))

    def distance(self) -> float:
        """Squared distance of this rank's partitions to the anchor (sum over ranks: the full distance)."""
        with torch.no_grad():
            return float(sum(((local_fp32(p) - p0) ** 2).sum() for p, p0 in zip(self.params, self.anchor)))
