"""Cross-entropy (and KL to a teacher) of a linear output head, without the full ``[N, V]`` logits.

At a 128k vocabulary one fp32 ``[2·4096, V]`` logits tensor is 4.2 GB, and the
plain path (``F.cross_entropy(logits.float())``, KD's two ``log_softmax``)
keeps several. Here the logits exist one chunk of tokens at a time, and the
gradients are formed in the same pass, so nothing is recomputed:

    per chunk   s = h·Wᵀ (in W's dtype, upcast to fp32); the chunk's CE and KL;
                ∂loss/∂s in fp32; grad_h[chunk] = ∂s·W; grad_W += ∂sᵀ·h
    backward    grad_h and grad_W times the upstream scalar

That is three GEMMs, as the plain path's forward and backward. It needs the
ratio of the two terms before the forward, so the differentiable output is one
sum ``ce_weight · CE + kl_weight · KL``; the two sums come back detached for
logging. (The objective knows every head-loss weight up front, except the kl
replay strategy's dynamic weight, which it measures in a no-grad pass first.) Liger-Kernel's fused linear CE does
the same in Triton; it has no CPU path, so CI could not run the code users
train with, and its distillation loss is JSD, not this KL.

On GPU: the GEMMs run in the weight's dtype (bf16 on cuBLAS, fp32 accumulate),
exactly as ``lm_head`` does in the plain path, so the logits round the same way;
all softmax arithmetic is fp32. ``grad_W`` accumulates in the weight's dtype
(an fp32 ``[V, H]`` accumulator would be 2 GB at 128k × 4096, as big as what the
chunking saves): each chunk's product is summed in fp32 inside the GEMM, but
the running sum is rounded to bf16 once per chunk (32 times at 8k tokens,
against once in the plain path), so the head's gradient is a little noisier
in bf16 (tests bound it). ``grad_W`` and ``grad_h`` live from this forward to
its backward, which the trainer runs right after, and are scaled in place
there; every tensor is made on ``hidden``'s device. The teacher's weight is
only read; under ZeRO-3 the caller gathers it (``head.py``). Without autograd
(no_grad, or nothing requires grad) only the sums are computed.

:func:`linear_ce_kl_reference` is the plain full-logits computation the tests
compare against, in value and in gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kl import kl_sum

IGNORE = -100
CHUNK_BYTES = 128 << 20  # one fp32 chunk of logits: 256 tokens at a 128k vocabulary


@dataclass
class TeacherHead:
    """The frozen teacher's final hidden states and output weight (no gradients), on the student's first ``M``
    tokens: KL covers those only, so a caller that distils some rows puts them first and runs no teacher GEMM
    for the rest (with ``kd.rows: general``, ~85% of the tokens at a 15% mix)."""

    hidden: torch.Tensor  # [M, Ht], M <= N
    weight: torch.Tensor  # [V, Ht]
    mask: torch.Tensor  # [M] bool: of those tokens, the ones KL applies to
    temperature: float = 1.0


def chunk_tokens_for(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    return max(1, budget_bytes // (vocab * 4))


def linear_ce_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherHead | None = None,
    kl_weight: float = 1.0,
    chunk_tokens: int | None = None,
    ce_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce_weight · CE + kl_weight · KL, CE, KL): sums, the first differentiable, the other two detached.

    CE over tokens whose target is not -100; KL(teacher ‖ student) at the teacher's temperature,
    times T², over the teacher's tokens (the first M) where ``teacher.mask`` (0 without a teacher).
    hidden [N, H], weight [V, H], targets [N].
    """
    chunk = chunk_tokens or chunk_tokens_for(weight.shape[0])
    sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)  # filled in by the forward: (CE, KL)
    grads = torch.is_grad_enabled()  # needs_input_grad inside the Function ignores no_grad
    distill = (
        (teacher.hidden, teacher.weight, teacher.mask, teacher.temperature, kl_weight)
        if teacher is not None
        else (None, None, None, 1.0, 0.0)
    )
    loss = _LinearCEKL.apply(hidden, weight, targets, *distill, ce_weight, chunk, sums, grads)
    return loss, sums[0], sums[1]


class _LinearCEKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        teacher_hidden: torch.Tensor | None,
        teacher_weight: torch.Tensor | None,
        kl_mask: torch.Tensor | None,
        temperature: float,
        kl_weight: float,
        ce_weight: float,
        chunk: int,
        sums: torch.Tensor,
        grads: bool,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        distilled = teacher_hidden.shape[0] if teacher_hidden is not None else 0  # KL on tokens [0, distilled)
        if distilled and not (distilled <= n and kl_mask.shape[0] == distilled):  # shapes: no device sync
            raise ValueError(f"a teacher on {distilled} tokens with a mask of {kl_mask.shape[0]}, for {n} tokens")
        want_h, want_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        valid = targets != IGNORE
        safe_targets = targets.clamp_min(0)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        # d(T²·KL)/ds = T·(softmax(s/T) − softmax(t/T)); dCE/ds = softmax(s) − onehot(target).
        # In place where it can be: a chunk holds at most 4 fp32 [chunk, V] tensors with KD, 2 without.
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            s = (hidden[rows] @ weight.T).float()
            keep = valid[rows]
            kl_grad = None
            d = min(rows.stop, distilled) - start  # this chunk's tokens with a teacher: a prefix of it
            if d > 0:
                mask = kl_mask[start : start + d].float()
                log_pt = (teacher_hidden[start : start + d] @ teacher_weight.T).float().div_(temperature)
                log_pt -= log_pt.logsumexp(-1, keepdim=True)
                log_ps = s[:d] / temperature
                log_ps -= log_ps.logsumexp(-1, keepdim=True)
                p_t = log_pt.exp()
                per_token = torch.einsum("nv,nv->n", p_t, log_pt.sub_(log_ps))  # one difference: no cancellation
                sums[1] += (per_token * mask).sum() * (temperature * temperature)
                del log_pt
                if want_h or want_w:
                    kl_grad = log_ps.exp_().sub_(p_t).mul_((mask * (kl_weight * temperature))[:, None])
                del p_t, log_ps
            # Softmax in place: one exp per logit and no second [chunk, V] tensor (logsumexp makes one, and
            # the gradient's softmax would exponentiate again). lse = m + log Σ exp(s − m).
            picked = s.gather(1, safe_targets[rows, None]).squeeze(1)
            top = s.amax(-1, keepdim=True)
            total = s.sub_(top).exp_().sum(-1, keepdim=True)
            sums[0] += ((top + total.log()).squeeze(1).sub_(picked).mul_(keep)).sum()
            if not (want_h or want_w):
                continue
            grad_s = s.div_(total)
            grad_s[torch.arange(grad_s.shape[0], device=s.device), safe_targets[rows]] -= 1.0
            grad_s.mul_((keep * ce_weight)[:, None])
            if kl_grad is not None:
                grad_s[: kl_grad.shape[0]] += kl_grad
                del kl_grad
            grad_s = grad_s.to(weight.dtype)
            if want_h:
                grad_h[rows] = grad_s @ weight
            if want_w:
                grad_w.addmm_(grad_s.T, hidden[rows])
        # Kept on ctx, not saved: they are neither inputs nor outputs, and backward scales them in place
        # (a second [V, H] copy per call would double the head's gradient memory).
        ctx.grad_h, ctx.grad_w = grad_h, grad_w
        return ce_weight * sums[0] + kl_weight * sums[1]

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None
        for grad in (grad_h, grad_w):
            if grad is not None:
                grad.mul_(grad_loss.to(grad.dtype))
        return (grad_h, grad_w, *([None] * 10))


def linear_ce_kl_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherHead | None = None,
    kl_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain computation with full logits, as the training loss was formed before chunking."""
    logits = hidden @ weight.T
    ce = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    if teacher is None:
        return ce_weight * ce, ce.detach(), torch.zeros((), device=hidden.device)
    m = teacher.hidden.shape[0]
    kl = kl_sum(logits[:m], teacher.hidden @ teacher.weight.T, teacher.mask, teacher.temperature)
    return ce_weight * ce + kl_weight * kl, ce.detach(), kl.detach()
