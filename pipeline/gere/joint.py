"""Replay rows in the task rows' forward: where padded replay samples go in packed rows, and back out.

A separate replay forward costs a second pass over the model per micro-batch,
and under ZeRO-3 a second all-gather of every parameter, forward and backward.
Instead the replay samples ride in the task forward as extra packed rows of
``seq_len`` tokens: each sample in its own slot of ``replay_len`` tokens whose
position ids restart at 0, so attention keeps it apart from every other
document (``pipeline.runtime.isolation``) and it sees exactly what it sees alone.
Padding stays at the end of its slot, after the sample's real tokens: causal
attention never lets a real token see it, so no attention mask is needed.

TM is 0 at step 1 only if these states reproduce the cached ones bit for bit.
Per-token ops (norms, MLP, the projections) compute a GEMM row the same way
wherever it sits and whatever the other rows hold, as the separate forward
already assumes (a sample's row in a cache batch is not its row in training);
but a GPU GEMM library picks its kernel (tiling, split-K) by shape, so
``pipeline.gere.build`` builds a cache for this layout with forwards of
training's shape (micro_batch filler rows, then the replay rows;
:func:`joint_hidden`). Attention must not depend on where a sample sits in
its row either. Flash attention's varlen path runs each document from its
own start. On CPU (tests/test_joint_replay.py), sdpa gives the separate
forward's states bit for bit, in any slot and beside any task rows, where a
sample fills its row or the slots are short (64 of 128-512); with several
slots of 128 tokens or more a row, a sample's states move with its slot by
fp32 rounding (7e-7 to 1.7e-6 measured), so TM at step 1 is 0 up to a rounding
flip at a threshold. Elsewhere :func:`replay_layout` keeps the samples' own
forward unless told otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from cpt_core.errors import ConfigError

from ..config import TrainConfig
from ..runtime.isolation import VARLEN_FROM_ONE_ROW, forward_packed
from .sampler import replay_plan

log = logging.getLogger(__name__)


MAX_PADDING = 0.1  # auto: at most this share of the packed replay rows may be slots left empty


def replay_layout(
    cfg: TrainConfig, replay_len: int, seq_len: int, world: int, head_loss: bool, device_type: str
) -> ReplayLayout | None:
    """The packed layout of ``cfg``'s replay samples, or None for a forward of their own (``replay.forward``).

    ``head_loss``: the model's loss runs from hidden states (``pipeline/losses/head.py``), which is what the
    joint forward returns. ``auto`` also asks that the packed rows waste little (a lone sample in a row of
    four slots would cost four times its tokens) and that a sample's states cannot depend on where it sits,
    since the cache sees it in another row and slot than training does: on CPU (bitwise, or within fp32
    rounding where a row holds several slots of 128 tokens or more; tests/test_joint_replay.py) and with
    flash attention's varlen path, which runs each document from its own start. On CUDA, sdpa's masked
    kernels and eager's softmax run over the whole row, with blocks at absolute positions, so there the
    samples keep their own forward unless ``joint`` is asked for.

    The ``kl`` strategy compares the student's states with the frozen teacher's, which scores the samples in
    their own padded forward. On CPU the joint forward's states are that forward's, bit for bit or within fp32
    rounding (above), so KL starts at 0 or at a floor bench/joint_kl_floor.py measured at 6e-9 in fp32,
    1.1e-3 of the KL one step at lr 2e-5 makes (7e-3 in bf16). On a GPU the joint forward runs its GEMMs on more
    rows than the teacher's padded forward, and a GEMM library picks its kernel (tiling, split-K) by shape; the
    floor there is not measured yet (no GPU was lent; bench/gpu_checks.sh measures it), so ``auto`` keeps kl's
    samples in their own forward on a GPU, where student and teacher run the same shapes. ``joint`` trades that
    floor for one ZeRO-3 gather of the model less per micro-batch with replay rows.
    """
    mode, strategy = cfg.replay.forward, cfg.replay.strategy
    if mode == "separate" or strategy == "none":
        return None
    why_not = None
    if replay_len > seq_len:
        why_not = f"replay samples are longer than the task rows (replay_len {replay_len} > seq_len {seq_len})"
    elif not head_loss:
        why_not = "the model's loss runs from full logits (no chunked head loss)"
    if why_not is not None:
        if mode == "joint":
            raise ConfigError(f"replay.forward joint cannot apply: {why_not}; use auto or separate")
        log.info("replay rows in their own forward: %s", why_not)
        return None
    layout = ReplayLayout(replay_len, seq_len)
    per_forward, _ = replay_plan(cfg.replay.samples_per_step, world, cfg.batch.grad_accum)
    padding = 1 - per_forward * replay_len / (layout.rows_for(per_forward) * seq_len)
    attn = cfg.model.attn_implementation
    if padding > MAX_PADDING:
        why_not = (
            f"{per_forward} sample(s) of {replay_len} tokens a forward would leave {padding:.0%} of their packed "
            f"rows of {seq_len} empty"
        )
    elif device_type != "cpu" and strategy == "kl":
        why_not = (
            f"on {device_type} the joint forward's states differ by rounding from the teacher's padded forward of "
            "the same samples, so KL would start at a floor not measured there (bench/joint_kl_floor.py)"
        )
    elif device_type != "cpu" and attn not in VARLEN_FROM_ONE_ROW:
        why_not = (
            f"with {attn} on {device_type} a sample's states may depend on where it sits in its row, so the "
            "cache could not reproduce them bit for bit"
        )
    if why_not is None:
        return layout
    if mode == "joint":
        log.warning("replay.forward joint: %s", why_not)
        return layout
    log.info("replay rows in their own forward (replay.forward auto): %s", why_not)
    return None


@dataclass(frozen=True)
class ReplayLayout:
    """``slots`` replay samples of ``replay_len`` tokens side by side in each packed row of ``seq_len`` tokens."""

    replay_len: int
    seq_len: int

    @property
    def slots(self) -> int:
        return self.seq_len // self.replay_len

    def rows_for(self, samples: int) -> int:
        return -(-samples // self.slots)

    def pack(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded replay rows ``[R, replay_len]`` → packed ``(input_ids, position_ids)``, each ``[rows, seq_len]``.

        Unused slots and the row's tail (seq_len not a multiple of replay_len) hold pad id 0 as documents of
        their own; the position ids of every slot are ``0 .. replay_len - 1``.
        """
        samples, rows = ids.shape[0], self.rows_for(ids.shape[0])
        body = ids.new_zeros((rows * self.slots, self.replay_len))
        body[:samples] = ids
        tail = self.seq_len - self.slots * self.replay_len
        packed = torch.cat([body.view(rows, -1), ids.new_zeros((rows, tail))], dim=1)
        positions = torch.cat(
            [torch.arange(self.replay_len, device=ids.device).repeat(self.slots), torch.arange(tail, device=ids.device)]
        )
        return packed, positions.expand(rows, -1).contiguous()

    def unpack(self, hidden: torch.Tensor, samples: int) -> torch.Tensor:
        """Hidden states of the packed rows ``[rows, seq_len, H]`` → the samples' ``[samples, replay_len, H]``."""
        rows, _, width = hidden.shape
        body = hidden[:, : self.slots * self.replay_len]
        return body.reshape(rows * self.slots, self.replay_len, width)[:samples]


def joint_hidden(
    model: Any,
    task_ids: torch.Tensor,
    task_positions: torch.Tensor,
    replay_ids: torch.Tensor,
    layout: ReplayLayout,
    attn_implementation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over task rows and replay samples: final hidden states ``([B, L, H], [R, replay_len, H])``.

    The replay rows follow the task rows, so a cache built with filler task rows in front of the samples
    (``pipeline.gere.build``) runs the same shapes as training.
    """
    packed_ids, packed_positions = layout.pack(replay_ids)
    hidden = forward_packed(
        model,
        torch.cat([task_ids, packed_ids]),
        torch.cat([task_positions, packed_positions]),
        attn_implementation,
        hidden=True,
    )
    rows = task_ids.shape[0]
    return hidden[:rows], layout.unpack(hidden[rows:], replay_ids.shape[0])


def filler_task_rows(rows: int, seq_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in task rows for building a cache in the joint layout: pad ids, two documents a row.

    Two documents, because training's packed task rows restart their position ids inside a row, and
    transformers builds the packed-document mask (rather than taking the plain causal path) only when some
    row does: the cache's forward must take the same attention path as training's.
    """
    half = seq_len // 2
    positions = torch.cat([torch.arange(half), torch.arange(seq_len - half)]).to(device).expand(rows, -1)
    return torch.zeros((rows, seq_len), dtype=torch.long, device=device), positions.contiguous()
