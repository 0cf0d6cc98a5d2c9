"""GeRe's threshold-based margin (TM) loss: fused Triton kernel, autograd Function, PyTorch reference.

For a replay token's hidden state h (final layer, after the final norm) and the
reference model's 2-bit state s of each element (see ``pipeline.gere.states``),
with per-dimension thresholds neg = m - std, pos = m + std:

    s = neg:      l = relu(h - neg)                  (stay at or below neg)
    s = pos:      l = relu(pos - h)                  (stay at or above pos)
    s = neutral:  l = relu(h - pos) + relu(neg - h)  (stay between)

    TM = sum(l over real tokens) / #(l > 0),   0 when nothing is violated.

Gradient (the count is a step function of h, so it is a constant almost everywhere):

    dTM/dh = g / count,  g = +1 (s=neg, h > neg), -1 (s=pos, h < pos),
                             +1 (s=neutral, h > pos), -1 (s=neutral, h < neg), else 0.

The fused path reads h and the packed states once per pass: the forward pass
writes one partial (sum, count) per program, the backward pass recomputes g
on the fly and writes dL/dh directly. No [tokens, H] mask or intermediate
is ever materialised; the reference does exactly that, readably.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pipeline.gere.states import NEG, POS, packed_width, unpack_states

BLOCK_T = 4  # token rows per program: few rows, many columns keeps loads coalesced along H


# --- reference ----------------------------------------------------------------------------------------


def tm_loss_reference(
    h: torch.Tensor, packed: torch.Tensor, neg: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TM, count) by the definition: h [..., H], packed [..., ceil(H/4)], neg/pos [H], mask [...]."""
    states = unpack_states(packed, h.shape[-1])
    x = h.float()
    relu = torch.relu
    per_element = torch.where(
        states == NEG, relu(x - neg), torch.where(states == POS, relu(pos - x), relu(x - pos) + relu(neg - x))
    )
    per_element = per_element * mask.unsqueeze(-1).to(per_element.dtype)
    count = (per_element > 0).sum()
    total = per_element.sum()
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)), count


# --- kernels ------------------------------------------------------------------------------------------


@triton.jit
def _tm_forward_kernel(
    h_ptr,
    packed_ptr,
    neg_ptr,
    pos_ptr,
    mask_ptr,
    part_sum_ptr,
    part_count_ptr,
    n_tokens,
    hidden,
    stride_h,
    stride_packed,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Masked sum of l and count of l > 0 over one block of BLOCK_T token rows, as one partial per program.

    Args:
        h_ptr: hidden states [n_tokens, hidden], fp32/bf16/fp16, unit stride along hidden; read as fp32.
        packed_ptr: reference states [n_tokens, ceil(hidden / 4)] uint8; element j is bits 2*(j % 4) of
            byte j // 4 (0 neutral, 1 neg, 2 pos), as written by ``pipeline.gere.states.pack_states``.
        neg_ptr, pos_ptr: thresholds [hidden] fp32.
        mask_ptr: [n_tokens] uint8, nonzero for real tokens; other rows contribute nothing.
        part_sum_ptr: out, [cdiv(n_tokens, BLOCK_T)] fp32, this program's sum of l. Partials, not an atomic
            total, so the host reduces them in a fixed order and the loss is deterministic.
        part_count_ptr: out, [cdiv(n_tokens, BLOCK_T)] int32, this program's count of l > 0 (at most
            BLOCK_T * hidden, so int32 is enough per program; the host sums in int64).
        n_tokens: rows of h; rows past it in the last block are masked off.
        hidden: H, columns of h.
        stride_h: elements between consecutive rows of h (>= hidden).
        stride_packed: bytes between consecutive rows of packed.
        BLOCK_T: token rows per program.
        BLOCK_H: columns per loop step, a power of two; the loop walks H in steps of it.
    """
    # int64 row indices: rows * stride_h is an element offset, which wraps in int32 once n_tokens * hidden
    # passes 2^31, e.g. beyond 256k tokens x 8192 hidden. Offsets within a row (cols) stay int32: < hidden.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    keep = tl.load(mask_ptr + rows, mask=rows < n_tokens, other=0) != 0
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.int32)
    for start in range(0, hidden, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        in_bounds = keep[:, None] & (cols < hidden)[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=in_bounds, other=0.0).to(tl.float32)
        byte = tl.load(packed_ptr + rows[:, None] * stride_packed + (cols // 4)[None, :], mask=in_bounds, other=0)
        state = (byte.to(tl.int32) >> ((cols % 4) * 2)[None, :]) & 3
        neg = tl.load(neg_ptr + cols, mask=cols < hidden, other=0.0)[None, :]
        pos = tl.load(pos_ptr + cols, mask=cols < hidden, other=0.0)[None, :]
        loss = tl.where(
            state == 1,
            tl.maximum(h - neg, 0.0),
            tl.where(state == 2, tl.maximum(pos - h, 0.0), tl.maximum(h - pos, 0.0) + tl.maximum(neg - h, 0.0)),
        )
        loss = tl.where(in_bounds, loss, 0.0)
        acc += loss
        cnt += (loss > 0.0).to(tl.int32)
    tl.store(part_sum_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
    tl.store(part_count_ptr + pid, tl.sum(tl.sum(cnt, axis=1), axis=0))


@triton.jit
def _tm_backward_kernel(
    h_ptr,
    packed_ptr,
    neg_ptr,
    pos_ptr,
    mask_ptr,
    scale_ptr,
    grad_ptr,
    n_tokens,
    hidden,
    stride_h,
    stride_packed,
    stride_grad,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """dL/dh = g * scale for one block of BLOCK_T token rows, g recomputed from h and the states.

    Args:
        h_ptr, packed_ptr, neg_ptr, pos_ptr, mask_ptr, n_tokens, hidden, stride_h, stride_packed, BLOCK_T,
            BLOCK_H: as in ``_tm_forward_kernel``.
        scale_ptr: [1] fp32, dL/dTM / count, or 0 when count == 0. A device tensor rather than a scalar
            argument so the backward pass never waits on the GPU to read count back.
        grad_ptr: out, [n_tokens, hidden], dtype of h; every element of every row < n_tokens is written
            (zero on masked rows), so it may be allocated uninitialised.
        stride_grad: elements between consecutive rows of grad.
    """
    # int64 row indices, as in the forward kernel: rows * stride wraps in int32 beyond 2^31 elements.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_tokens
    keep = tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0
    scale = tl.load(scale_ptr)  # dL/dTM / count, or 0 when count == 0
    for start in range(0, hidden, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        col_ok = cols < hidden
        live = keep[:, None] & col_ok[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=live, other=0.0).to(tl.float32)
        byte = tl.load(packed_ptr + rows[:, None] * stride_packed + (cols // 4)[None, :], mask=live, other=0)
        state = (byte.to(tl.int32) >> ((cols % 4) * 2)[None, :]) & 3
        neg = tl.load(neg_ptr + cols, mask=col_ok, other=0.0)[None, :]
        pos = tl.load(pos_ptr + cols, mask=col_ok, other=0.0)[None, :]
        up = (h > pos).to(tl.float32)
        down = (h < neg).to(tl.float32)
        g = tl.where(state == 1, (h > neg).to(tl.float32), tl.where(state == 2, -(h < pos).to(tl.float32), up - down))
        g = tl.where(live, g * scale, 0.0)
        tl.store(
            grad_ptr + rows[:, None] * stride_grad + cols[None, :],
            g.to(grad_ptr.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


# --- host launchers -----------------------------------------------------------------------------------


def _flatten(h: torch.Tensor, packed: torch.Tensor, neg: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor):
    hidden = h.shape[-1]
    if packed.shape[:-1] != h.shape[:-1] or packed.shape[-1] != packed_width(hidden):
        raise ValueError(f"packed states {tuple(packed.shape)} do not match hidden states {tuple(h.shape)}")
    if mask.shape != h.shape[:-1]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match hidden states {tuple(h.shape[:-1])}")
    if neg.shape != (hidden,) or pos.shape != (hidden,):
        raise ValueError(f"thresholds must be [{hidden}], got {tuple(neg.shape)} and {tuple(pos.shape)}")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed states must be uint8, got {packed.dtype}")
    h2 = h.reshape(-1, hidden)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    p2 = packed.reshape(-1, packed.shape[-1]).contiguous()
    return (h2, p2, neg.float().contiguous(), pos.float().contiguous(), mask.reshape(-1).to(torch.uint8).contiguous())


def _block_h(hidden: int) -> int:
    return min(1024, triton.next_power_of_2(hidden))


def _forward(h2, p2, neg, pos, mask) -> tuple[torch.Tensor, torch.Tensor]:
    n_tokens, hidden = h2.shape
    programs = triton.cdiv(n_tokens, BLOCK_T)
    part_sum = torch.empty(programs, dtype=torch.float32, device=h2.device)
    part_count = torch.empty(programs, dtype=torch.int32, device=h2.device)
    _tm_forward_kernel[(programs,)](
        h2,
        p2,
        neg,
        pos,
        mask,
        part_sum,
        part_count,
        n_tokens,
        hidden,
        h2.stride(0),
        p2.stride(0),
        BLOCK_T=BLOCK_T,
        BLOCK_H=_block_h(hidden),
    )
    total = part_sum.double().sum()  # fixed order: deterministic, unlike atomics
    count = part_count.long().sum()
    loss = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total)).float()
    return loss, count


class TMLossFunction(torch.autograd.Function):
    """Fused TM loss; returns (loss, count), differentiable in ``h`` only.

    forward(h, packed, neg, pos, mask):
        h: hidden states [..., H], fp32/bf16/fp16 (final layer, after the final norm).
        packed: reference states [..., ceil(H / 4)] uint8, from ``pipeline.gere.states.pack_states``.
        neg, pos: thresholds [H], any float dtype (used as fp32).
        mask: [...] (h's leading shape), 0/1 as bool or integer: 1 marks a real token, 0 padding.
        Returns loss (0-dim fp32) and count (0-dim int64, the number of elements with l > 0; not
        differentiable). h is saved in its own dtype (no fp32 copy); the backward pass re-reads it.

    backward(grad_loss, grad_count): grad_loss is dL/dTM; grad_count is ignored (count is an integer).
        Returns dL/dh in h's shape and dtype, and None for packed, neg, pos and mask.
    """

    @staticmethod
    def forward(ctx, h, packed, neg, pos, mask):  # type: ignore[override]
        h2, p2, neg32, pos32, mask8 = _flatten(h, packed, neg, pos, mask)
        loss, count = _forward(h2, p2, neg32, pos32, mask8)
        ctx.save_for_backward(h2, p2, neg32, pos32, mask8, count)
        ctx.shape = h.shape
        ctx.mark_non_differentiable(count)
        return loss, count

    @staticmethod
    def backward(ctx, grad_loss, grad_count):  # type: ignore[override]
        h2, p2, neg32, pos32, mask8, count = ctx.saved_tensors
        n_tokens, hidden = h2.shape
        scale = torch.where(count > 0, grad_loss.float() / count.clamp_min(1), torch.zeros_like(grad_loss.float()))
        grad = torch.empty_like(h2)
        _tm_backward_kernel[(triton.cdiv(n_tokens, BLOCK_T),)](
            h2,
            p2,
            neg32,
            pos32,
            mask8,
            scale.reshape(1).contiguous(),
            grad,
            n_tokens,
            hidden,
            h2.stride(0),
            p2.stride(0),
            grad.stride(0),
            BLOCK_T=BLOCK_T,
            BLOCK_H=_block_h(hidden),
        )
        return grad.view(ctx.shape), None, None, None, None


def fused_available(device: torch.device) -> bool:
    """The Triton path runs on CUDA, or anywhere under TRITON_INTERPRET=1 (tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def tm_loss(
    h: torch.Tensor,
    packed: torch.Tensor,
    neg: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TM loss and violated-element count.

    Args:
        h: hidden states [..., H], fp32/bf16/fp16; the only argument that gets a gradient.
        packed: reference states [..., ceil(H / 4)] uint8, from ``pipeline.gere.states.pack_states``.
        neg, pos: thresholds [H] (per-dimension mean -/+ std of the reference activations).
        mask: [...] (h's leading shape), 0/1 as bool or integer: 1 marks a real token, 0 padding.
        fused: True runs the Triton kernels, False the PyTorch reference (which materialises [tokens, H]
            intermediates), None picks the kernels where they can run (``fused_available``).

    Returns:
        (loss, count): 0-dim fp32 TM, and 0-dim int64 number of elements with l > 0.
    """
    if fused is None:
        fused = fused_available(h.device)
    if fused:
        return TMLossFunction.apply(h, packed, neg, pos, mask)
    return tm_loss_reference(h, packed, neg, pos, mask)
