"""The replay term of the objective, one strategy per config value, as the GeRe paper compares them.

    none  no replay term
    ce    plain replay: next-token cross-entropy on the replay rows
    kl    KL(teacher || student) on the replay rows' next-token distributions, the
          frozen base model as teacher (forward online), temperature T (scaled by T²)
    l1/l2 feature imitation: mean |h - h_ref| or (h - h_ref)² against cached bf16 states
    tm    GeRe's threshold-based margin loss against the cached 2-bit states

CE on replay rows is added for every strategy except none (the paper trains on
replay text as well). How the terms are weighted into the step's loss is
``pipeline/losses/objective.py``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config import ReplayConfig
from .kl import kl_sum
from .linear_ce import TeacherHead
from .tm_loss import tm_loss

if TYPE_CHECKING:  # the head loss imports DeepSpeed; these functions only call it
    from .head import HeadLoss


@dataclass
class ReplayInputs:
    """What one step's replay rows bring: mask [B, L]; states/features/teacher as the strategy needs.

    Rows from ``real`` on (None: none) pad the forward to its shape: the model sees them, the loss does not.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    states: torch.Tensor | None = None  # packed 2-bit states (tm)
    neg: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    features: torch.Tensor | None = None  # cached reference hidden states, bf16 (l1, l2)
    teacher_logits: torch.Tensor | None = None  # frozen base model on the same rows (kl)
    teacher_hidden: torch.Tensor | None = None  # instead of teacher_logits: its final hidden states, for the head
    real: int | None = None
    counts: tuple[int, int] | None = None  # token_counts(), once read

    def token_counts(self) -> tuple[int, int]:
        """(replay CE targets, loss-mask tokens), each at least 1. Read once: the feed reads them from the rows
        on the host, before they move to the device, so the step reads nothing back for them on a GPU."""
        if self.counts is None:
            mask = self.loss_mask
            targets = (_causal_targets(self.input_ids, mask) != -100).sum()
            self.counts = (max(int(targets), 1), max(int(mask.sum()), 1))
        return self.counts

    @property
    def loss_mask(self) -> torch.Tensor:
        """The attention mask with the padding rows zeroed: the tokens the replay terms average over."""
        if self.real is None or self.real >= self.attention_mask.shape[0]:
            return self.attention_mask
        keep = torch.arange(self.attention_mask.shape[0], device=self.attention_mask.device) < self.real
        return self.attention_mask * keep.unsqueeze(1).to(self.attention_mask.dtype)


def causal_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over positions whose target is a real token; 0 where there is none (a chunk of padding
    rows only: cross_entropy's own mean would be 0/0)."""
    targets = _causal_targets(input_ids, mask)
    total = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return total / (targets != -100).sum().clamp_min(1)


def causal_ce_from_hidden(
    head: HeadLoss, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """:func:`causal_ce` through the head loss, from final hidden states [B, L, H]."""
    targets = _causal_targets(input_ids, mask).flatten()
    ce_sum, _, _ = head(hidden[:, :-1].flatten(0, 1), targets, None, 0.0)
    return ce_sum / (targets != -100).sum().clamp_min(1)


def _causal_targets(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L-1] next tokens, -100 where the position or its target is padding."""
    target_mask = mask[:, 1:].bool() & mask[:, :-1].bool()
    return input_ids[:, 1:].masked_fill(~target_mask, -100)


def replay_terms(
    cfg: ReplayConfig,
    logits: torch.Tensor | None,
    hidden: torch.Tensor,
    batch: ReplayInputs,
    head: HeadLoss | None = None,
) -> dict[str, torch.Tensor]:
    """{'replay_ce': ..., '<strategy>': ...}: the unweighted terms, each a mean over the replay tokens.

    Without ``logits``, replay CE goes through ``head`` from ``hidden``; the ``kl`` strategy then goes through
    :func:`kl_from_hidden` instead, which needs the weights up front.

    Missing inputs are a wiring bug (the config was validated and ``pipeline.gere.feed``
    loads what the strategy needs), so they raise ``ValueError``, not a user error.
    """
    if cfg.strategy == "none":
        return {}
    mask = batch.loss_mask
    if logits is None:
        if head is None or cfg.strategy == "kl":
            raise ValueError("replay outputs without logits need a head loss (and kl_from_hidden for kl)")
        terms = {"replay_ce": causal_ce_from_hidden(head, hidden, batch.input_ids, mask)}
    else:
        terms = {"replay_ce": causal_ce(logits, batch.input_ids, mask)}
    m = mask.unsqueeze(-1).to(torch.float32)
    if cfg.strategy == "tm":
        if batch.states is None or batch.neg is None or batch.pos is None:
            raise ValueError("replay.strategy 'tm' needs the GeRe cache's states and thresholds")
        terms["tm"] = tm_loss(hidden, batch.states, batch.neg, batch.pos, mask, fused=cfg.fused_tm)[0]
    elif cfg.strategy in ("l1", "l2"):
        if batch.features is None:
            raise ValueError(
                f"replay.strategy '{cfg.strategy}' needs cached features (build the cache with --features)"
            )
        diff = (hidden.float() - batch.features.float()) * m
        per = diff.abs() if cfg.strategy == "l1" else diff * diff
        terms[cfg.strategy] = per.sum() / (m.sum() * hidden.shape[-1]).clamp_min(1)
    elif cfg.strategy == "kl":
        if batch.teacher_logits is None:
            raise ValueError("replay.strategy 'kl' needs the frozen base model's logits on the replay rows")
        terms["kl"] = kl_sum(logits, batch.teacher_logits, mask, cfg.kl_temperature) / mask.sum().clamp_min(1)
    return terms


def kl_from_hidden(
    head: HeadLoss,
    hidden: torch.Tensor,
    batch: ReplayInputs,
    teacher_weight: torch.Tensor,
    temperature: float,
    ce_weight: float,
    kl_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_weight · replay CE + kl_weight · KL, replay CE, KL) of the ``kl`` strategy through the head loss, from
    the student's and the teacher's final hidden states: the values :func:`replay_terms` makes from logits (each a
    mean over the replay tokens; the first differentiable), without either model's ``[R, L, V]`` logits.

    The head loss forms its gradient in its forward, so the weights come first. Every position of the rows
    goes through the head once: CE where a next token follows (the last position's target is -100), KL wherever
    the attention mask is set, as in :func:`replay_terms`.
    """
    if batch.teacher_hidden is None:
        raise ValueError("replay.strategy 'kl' from hidden states needs the frozen base model's hidden states")
    mask = batch.loss_mask
    targets = F.pad(_causal_targets(batch.input_ids, mask), (0, 1), value=-100).flatten()
    ce_tokens, kl_tokens = batch.token_counts()
    teacher = TeacherHead(batch.teacher_hidden.flatten(0, 1), teacher_weight, mask.flatten().bool(), temperature)
    # The head forms each token's gradient in its forward, in the weight's dtype: weights of ~1/tokens there
    # would underflow in fp16, whose loss scale is only applied in backward. So it gets weights of order 1, and
    # their common factor multiplies its output, reaching the gradients through backward (as 1/tokens does for
    # task CE and KD).
    ce_part, kl_part = ce_weight / ce_tokens, kl_weight / kl_tokens
    common = max(abs(ce_part), abs(kl_part)) or 1.0
    both, ce_sum, kl = head(hidden.flatten(0, 1), targets, teacher, kl_part / common, ce_part / common)
    return common * both, ce_sum / ce_tokens, kl / kl_tokens
