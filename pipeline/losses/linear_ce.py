"""Cross-entropy (and KL to a teacher) of a linear output head, without the full ``[N, V]`` logits.

At a 128k vocabulary one fp32 ``[2·4096, V]`` logits tensor is 4.2 GB, and the
plain path (``F.cross_entropy(logits.float())``, KD's two ``log_softmax``)
keeps several. Here the logits exist one chunk of tokens at a time:

    forward   per chunk: s = h·Wᵀ (in W's dtype, upcast to fp32), keep only the
              log-sum-exps (CE at T=1, student and teacher at the KD temperature)
    backward  per chunk: recompute s (and the teacher's t), form ∂loss/∂s in fp32,
              grad_h[chunk] = ∂s·W and grad_W += ∂sᵀ·h

Recomputing costs one more ``h·Wᵀ`` GEMM, but no state lives between forward and
backward beyond three floats a token, so the two outputs (CE and KL sums) can
take any upstream weights: the objective's dynamic weight is formed after both
are known. (Liger-Kernel's fused linear CE computes the gradients inside the
forward instead; it is Triton-only, so CI could not run the path users train
on, and it needs one fixed weight per output before the forward.)

On GPU: the GEMMs run in the weight's dtype (bf16 on cuBLAS, fp32 accumulate),
exactly as ``lm_head`` does in the plain path, so the logits round the same way;
all softmax arithmetic is fp32. ``grad_W`` accumulates in the weight's dtype
(an fp32 ``[V, H]`` accumulator would be 2 GB at 128k × 4096, as big as what the
chunking saves); each chunk's product is summed in fp32 inside the GEMM and
rounded once. Every tensor is made on ``hidden``'s device. The teacher's weight
is only read (no gradient); under ZeRO-3 the caller gathers it (``heads.py``).

:func:`linear_ce_kl_reference` is the plain full-logits computation the tests
compare against, in value and in gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_BYTES = 128 << 20  # one fp32 chunk of logits; backward holds ~4 such (student, teacher, two softmaxes)


@dataclass
class TeacherHead:
    """The frozen teacher's final hidden states on the same tokens, and its output weight (no gradients)."""

    hidden: torch.Tensor  # [N, Ht]
    weight: torch.Tensor  # [V, Ht]
    mask: torch.Tensor  # [N] bool: tokens KL applies to
    temperature: float = 1.0


def chunk_tokens_for(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    return max(1, budget_bytes // (vocab * 4))


def linear_ce_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: TeacherHead | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum over tokens whose target is not -100, KL(teacher ‖ student) sum × T² over ``teacher.mask``).

    hidden [N, H], weight [V, H], targets [N]. Without a teacher the KL sum is a 0 with no gradient path.
    """
    chunk = chunk_tokens or chunk_tokens_for(weight.shape[0])
    if teacher is None:
        ce, kl = _LinearCEKL.apply(hidden, weight, targets, None, None, None, 1.0, chunk)
    else:
        ce, kl = _LinearCEKL.apply(
            hidden, weight, targets, teacher.hidden, teacher.weight, teacher.mask, teacher.temperature, chunk
        )
    return ce, kl


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
        chunk: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        distill = teacher_hidden is not None
        valid = targets != IGNORE
        safe_targets = targets.clamp_min(0)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_student_t = torch.empty_like(lse) if distill else None
        lse_teacher_t = torch.empty_like(lse) if distill else None
        ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kl = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            s = (hidden[rows] @ weight.T).float()
            lse[rows] = torch.logsumexp(s, dim=-1)
            picked = s.gather(1, safe_targets[rows, None]).squeeze(1)
            ce += ((lse[rows] - picked) * valid[rows]).sum()
            if distill:
                t = (teacher_hidden[rows] @ teacher_weight.T).float() / temperature
                s = s.div_(temperature)
                lse_student_t[rows] = torch.logsumexp(s, dim=-1)
                lse_teacher_t[rows] = torch.logsumexp(t, dim=-1)
                log_pt = t.sub_(lse_teacher_t[rows, None])
                log_ps = s.sub_(lse_student_t[rows, None])
                per_token = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
                kl += (per_token * kl_mask[rows]).sum()
        ctx.save_for_backward(
            hidden, weight, targets, lse, teacher_hidden, teacher_weight, kl_mask, lse_student_t, lse_teacher_t
        )
        ctx.temperature, ctx.chunk = temperature, chunk
        kl = kl * (temperature * temperature)
        if not distill:
            ctx.mark_non_differentiable(kl)
        return ce, kl

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_kl: torch.Tensor):
        hidden, weight, targets, lse, t_hidden, t_weight, kl_mask, lse_s_t, lse_t_t = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk
        distill = t_hidden is not None and grad_kl is not None
        n = hidden.shape[0]
        valid = (targets != IGNORE).float()
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        # d(T²·KL)/ds = T·(softmax(s/T) − softmax(t/T)); dCE/ds = softmax(s) − onehot(target)
        kl_scale = (grad_kl * temperature).float() if distill else None
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            s = (hidden[rows] @ weight.T).float()
            grad_s = torch.zeros_like(s)
            if grad_ce is not None:
                probs = (s - lse[rows, None]).exp_()
                probs[torch.arange(probs.shape[0], device=probs.device), targets[rows].clamp_min(0)] -= 1.0
                grad_s += probs.mul_((grad_ce.float() * valid[rows])[:, None])
            if distill:
                t = (t_hidden[rows] @ t_weight.T).float()
                p_student = (s / temperature - lse_s_t[rows, None]).exp_()
                p_teacher = t.div_(temperature).sub_(lse_t_t[rows, None]).exp_()
                grad_s += (p_student - p_teacher).mul_((kl_scale * kl_mask[rows])[:, None])
            grad_s = grad_s.to(weight.dtype)
            if grad_h is not None:
                grad_h[rows] = grad_s @ weight
            if grad_w is not None:
                grad_w.addmm_(grad_s.T, hidden[rows])
        return grad_h, grad_w, None, None, None, None, None, None


def linear_ce_kl_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, teacher: TeacherHead | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain computation with full logits: what the training loss was before chunking."""
    logits = hidden @ weight.T
    ce = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")
    if teacher is None:
        return ce, torch.zeros((), device=hidden.device)
    temperature = teacher.temperature
    student = F.log_softmax(logits.float() / temperature, dim=-1)
    target = F.log_softmax((teacher.hidden @ teacher.weight.T).float() / temperature, dim=-1)
    kl = ((target.exp() * (target - student)).sum(-1) * teacher.mask).sum()
    return ce, kl * temperature * temperature
