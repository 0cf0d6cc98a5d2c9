"""The model's output head as a loss: CE, KD and replay KL from final hidden states, never the full logits.

The trained model gets a parameterless child module, ``head_loss``, added before
``deepspeed.initialize``. Under ZeRO-3 the head weight is partitioned and only
gathered around the forward and backward of a module that owns it; read
anywhere else it is an empty tensor. So the weight is registered as an external
parameter of ``head_loss`` (``deepspeed.zero.register_external_parameter``, the
documented way): DeepSpeed's hooks on that module gather it before the loss's
forward (where the chunked GEMMs and the gradients are computed) and
reduce-scatter its gradient like any other. They gather it again before the
module's backward too, which only scales stored gradients: one V × H all-gather
per call that is not needed (not measured yet; avoiding it would mean a loss
outside DeepSpeed's hooks, with its gradient reduced by hand). The child adds nothing to the state
dict, so checkpoints and exports are unchanged. The forward that feeds it asks
for ``logits_to_keep=1`` and takes the decoder's output with a hook
(:func:`final_hidden`), so ``lm_head`` produces a ``[B, 1, V]`` tensor instead
of ``[B, L, V]``.

Only models whose logits are exactly ``lm_head(final hidden)`` take this path
(a bias-free ``nn.Linear`` head, no logit soft-capping or scaling, a forward
that takes ``logits_to_keep``); others keep the plain full-logits loss, logged.

The frozen teacher's head is gathered once (:func:`frozen_head_weight`) and
kept: it never changes, and gathering it every micro-batch would all-gather
``V × H`` each time.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

import deepspeed
import torch
from torch import nn

from ..config import TrainConfig
from .linear_ce import TeacherHead, linear_ce_kl

log = logging.getLogger(__name__)

SCALED_LOGIT_SETTINGS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class HeadLoss(nn.Module):
    """(ce_weight · CE + kl_weight · KL, CE, KL) sums of the owning model's output head on hidden states; see
    :func:`linear_ce_kl`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # A callable, not an attribute holding the head: a Parameter or Module attribute would be registered
        # (a second copy in the state dict, or a module cycle).
        self._head_weight = lambda: model.get_output_embeddings().weight

    def forward(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        teacher: TeacherHead | None = None,
        kl_weight: float = 1.0,
        ce_weight: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return linear_ce_kl(hidden, self._head_weight(), targets, teacher, kl_weight, ce_weight=ce_weight)


def chunkable_head(model: nn.Module) -> str | None:
    """Why the model's logits are not plain ``lm_head(hidden)`` (so the head loss would be wrong), or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "its output head is not a bias-free nn.Linear"
    config = getattr(model, "config", None)
    for name in SCALED_LOGIT_SETTINGS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"its config scales or caps the logits ({name}={value})"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "its forward takes no logits_to_keep"
    return None


def loss_from_hidden(cfg: TrainConfig, model: nn.Module) -> bool:
    """Whether ``cfg``'s run of ``model`` takes its loss from hidden states (``head_loss``).

    The one test: the engine attaches the head loss by it, and the GeRe cache's layout and the memory
    planner predict the run with it (on a model built on the meta device)."""
    return cfg.model.chunked_loss and chunkable_head(model) is None


def attach_head_loss(model: nn.Module, cfg: TrainConfig) -> bool:
    """Add ``model.head_loss`` where :func:`loss_from_hidden` (before ``deepspeed.initialize``); whether it was."""
    if not loss_from_hidden(cfg, model):
        if cfg.model.chunked_loss:
            log.warning("loss from full logits (memory grows with vocabulary × tokens): %s", chunkable_head(model))
        return False
    model.add_module("head_loss", HeadLoss(model))
    # Registered whether or not ZeRO-3 partitions the model (now under zero.Init, or later in initialize):
    # below stage 3 DeepSpeed never reads the registration.
    deepspeed.zero.register_external_parameter(model.head_loss, model.get_output_embeddings().weight)
    log.info("loss from hidden states: the output head runs a chunk of tokens at a time, no full logits")
    return True


def final_hidden(model: Callable[..., Any], **inputs: torch.Tensor) -> torch.Tensor:
    """The decoder's output ``[B, L, H]`` on ``inputs`` (after the final norm: what ``lm_head`` reads), with the
    head run on one position only (``logits_to_keep=1``): the input of the head loss, without ``[B, L, V]``
    logits. Taken with a forward hook on the decoder, not with ``output_hidden_states``, which would keep every
    layer's output: under no_grad (a teacher) that is (layers + 1) × tokens × H, ~11 GB at 70B and 8k tokens."""
    captured: list[torch.Tensor] = []
    decoder = getattr(model, "module", model).base_model
    handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


def frozen_head_weight(model: nn.Module) -> torch.Tensor:
    """The output head weight, whole, on this rank (a copy gathered once under ZeRO-3)."""
    weight = model.get_output_embeddings().weight
    if not hasattr(weight, "ds_id"):
        return weight.detach()
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        return weight.detach().clone()
