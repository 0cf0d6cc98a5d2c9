"""Activation states of the reference model, packed 2 bits per element.

Each element of a reference hidden state is ``neg`` (<= mean - std of its
dimension), ``pos`` (>= mean + std) or ``neutral``. Four states fit a 2-bit
code, so a cache holds 1/16 of the fp32 activations: element ``j`` of a row
lives in byte ``j // 4`` at bits ``2 * (j % 4)``.
"""

from __future__ import annotations

import torch

NEUTRAL, NEG, POS = 0, 1, 2
ELEMENTS_PER_BYTE = 4


def packed_width(hidden: int) -> int:
    return (hidden + ELEMENTS_PER_BYTE - 1) // ELEMENTS_PER_BYTE


def activation_states(h: torch.Tensor, neg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """uint8 state per element of ``h`` [..., H] given per-dimension thresholds [H]."""
    h = h.float()
    states = torch.full(h.shape, NEUTRAL, dtype=torch.uint8, device=h.device)
    states[h <= neg] = NEG
    states[h >= pos] = POS  # pos > neg always (std > 0), so the two never overlap
    return states


def pack_states(states: torch.Tensor) -> torch.Tensor:
    """[..., H] uint8 states in {0, 1, 2} → [..., ceil(H / 4)] uint8."""
    hidden = states.shape[-1]
    pad = packed_width(hidden) * ELEMENTS_PER_BYTE - hidden
    s = torch.nn.functional.pad(states, (0, pad)).view(*states.shape[:-1], -1, ELEMENTS_PER_BYTE).to(torch.int32)
    shifts = torch.arange(0, 8, 2, device=states.device, dtype=torch.int32)
    return (s << shifts).sum(-1).to(torch.uint8)


def unpack_states(packed: torch.Tensor, hidden: int) -> torch.Tensor:
    """Inverse of :func:`pack_states`: [..., ceil(H / 4)] → [..., H] uint8."""
    shifts = torch.arange(0, 8, 2, device=packed.device, dtype=torch.int32)
    s = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 3
    return s.reshape(*packed.shape[:-1], -1)[..., :hidden].to(torch.uint8)
