"""Training data: the mixture in its prepared order, split over ranks, resumable by step number.

The mixture is already in training order (data_prep stratified it per global
batch), so step k uses rows [k·G, (k+1)·G) of it, wrapping into a new epoch at
the end (G = micro_batch × grad_accum × ranks). Within a global batch, slot
p = (micro_index · ranks + rank) · micro_batch + i: the set of rows per step
depends only on G, so a run resumed on another number of ranks with the same
global batch trains on the same rows in the same steps. Resuming is O(1): the
position is the step number.

A packed row becomes model inputs with position ids restarting at every
document segment (transformers then keeps attention inside each document)
and labels masked (-100) at each segment's first token (it must not be
predicted from the previous document) and where loss_mask is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from cpt_core.errors import UserError


class GlobalOrder:
    """Which mixture rows each rank reads at (step, micro_index)."""

    def __init__(self, num_rows: int, micro_batch: int, grad_accum: int, world: int, rank: int) -> None:
        self.num_rows, self.micro, self.accum, self.world, self.rank = num_rows, micro_batch, grad_accum, world, rank
        self.global_batch = micro_batch * grad_accum * world
        if num_rows < 1:
            raise UserError("the mixture has no rows")

    def rows(self, step: int, micro_index: int, rank: int | None = None) -> list[int]:
        """Rows of ``rank``'s (default: this rank's) micro-batch ``micro_index`` of ``step``."""
        rank = self.rank if rank is None else rank
        base = step * self.global_batch + (micro_index * self.world + rank) * self.micro
        return [(base + i) % self.num_rows for i in range(self.micro)]

    def global_rows(self, step: int) -> list[int]:
        base = step * self.global_batch
        return [(base + i) % self.num_rows for i in range(self.global_batch)]

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.num_rows


def role_flags(mixture: Any, role: str) -> np.ndarray:
    """Per mixture row, whether its role is ``role``: one Arrow column read at start-up (a byte a row, 10 MB at
    10M rows), so no step reads rows again to learn their roles, and any rank knows every rank's."""
    column = mixture.with_format("arrow")["role"]  # follows an index mapping (select, shuffle) if there is one
    return pc.equal(column, role).to_numpy(zero_copy_only=False).astype(np.bool_)


def teacher_rows(flags: np.ndarray, order: GlobalOrder, step: int, micro_index: int) -> list[int] | None:
    """Which rows of this rank's micro-batch the teacher runs on when only ``flags`` rows are distilled.

    None when no rank's micro-batch holds one (the teacher does not run); else this rank's flagged rows, or
    its first row when it has none (run, not used), because under ZeRO-3 the teacher's forward gathers
    parameters collectively and every rank must make the same choice. Each rank decides from the flags of
    every rank's rows, in host memory: no collective, no device sync.
    """
    if not any(flags[order.rows(step, micro_index, r)].any() for r in range(order.world)):
        return None
    return np.flatnonzero(flags[order.rows(step, micro_index)]).tolist() or [0]


def host_to_device(values: Any, device: torch.device) -> torch.Tensor:
    """Small host values (row flags, row indices) as a tensor on ``device``. On CUDA through page-locked memory
    and ``non_blocking``: a copy from pageable memory waits for the stream, i.e. for the step's queued work."""
    tensor = torch.as_tensor(values)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def packed_inputs(rows: dict[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
    """Batch of packed rows (input_ids, loss_mask, doc_lens) → input_ids, position_ids, labels."""
    ids = torch.as_tensor(np.asarray(rows["input_ids"], dtype=np.int64))
    loss_mask = torch.as_tensor(np.asarray(rows["loss_mask"], dtype=np.bool_))
    positions = torch.empty_like(ids)
    starts = torch.zeros_like(loss_mask)
    for b, lens in enumerate(rows["doc_lens"]):
        offset = 0
        for n in lens:
            positions[b, offset : offset + n] = torch.arange(n)
            starts[b, offset] = True
            offset += n
    labels = ids.masked_fill(~loss_mask | starts, -100)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def read_step(mixture: Any, order: GlobalOrder, step: int, pin: bool = False) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of ``step`` as model inputs on the host (only this rank's rows are read)."""
    batches = [packed_inputs(mixture[order.rows(step, j)]) for j in range(order.accum)]
    if pin:  # page-locked host memory: the copy to the GPU can then overlap compute (non_blocking)
        batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
    return batches


class StepReader:
    """Reads step s+1's micro-batches on a background thread while step s computes.

    Each rank reads only its own rows (micro_batch × grad_accum a step, whatever the global batch), so
    the cost per step does not grow with the number of ranks; the read of the next step overlaps this
    step's forwards and backwards (the GIL is released in Arrow's reads and torch's copies). Batches
    depend only on the step number, so a resumed run reads exactly what it would have.
    """

    def __init__(self, mixture: Any, order: GlobalOrder, device: torch.device) -> None:
        self.mixture, self.order, self.device = mixture, order, device
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-reader")
        self._next: tuple[int, Future] | None = None

    def read(self, step: int) -> list[dict[str, torch.Tensor]]:
        """Step ``step``'s micro-batches on the device; starts reading step + 1."""
        if self._next is not None and self._next[0] == step:
            host = self._next[1].result()
        else:  # the first step, or a step out of sequence (resume): read it now
            host = read_step(self.mixture, self.order, step, self.pin)
        self._next = (step + 1, self._pool.submit(read_step, self.mixture, self.order, step + 1, self.pin))
        return [{k: v.to(self.device, non_blocking=self.pin) for k, v in b.items()} for b in host]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def global_loss_tokens(micro: list[dict[str, torch.Tensor]], device: torch.device) -> int:
    """Loss tokens of the whole global batch: this rank counts its own micro-batches, one scalar all-reduce.

    A label at position t is predicted from position t-1, so position 0 never counts. The tensor is on
    ``device`` because NCCL reduces device tensors only.
    """
    counted = torch.stack([(b["labels"][:, 1:] != -100).sum() for b in micro]).sum().to(device, torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counted)
    return max(int(counted.item()), 1)  # the step's one read: the loss is scaled by it before the first forward
