"""KL(teacher || student) on next-token distributions: knowledge distillation and the ``kl`` replay strategy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_sum(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Sum over positions where ``mask`` is true of KL(teacher || student) at temperature T, times T².

    student_logits, teacher_logits: [..., V] (any dtype; the softmax runs in fp32); mask: [...].
    T² keeps the gradient's size independent of T (Hinton et al.), so one weight fits every T.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(-1)
    return (per_position * mask).sum() * temperature * temperature
