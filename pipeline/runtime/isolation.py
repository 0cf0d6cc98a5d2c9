"""Packed rows keep attention inside each document: the forward that does it, and a start-up check.

Rows carry several documents; ``position_ids`` restart at every document
(pipeline.training.data.packed_inputs). transformers turns restarting position ids into
per-document attention: for sdpa and eager through the packed-sequence mask
(``masking_utils``, when no attention mask is passed), for flash_attention_2
through its varlen path, which it takes only for a batch of one row. So for
FA2 (and FA3) a micro-batch of B rows is run as one row of B·L tokens: the
rows' position ids already restart at 0 at every row start, so the
documents, and the rows, stay apart.

Whether this holds depends on the attention implementation and the
transformers version, so ``pipeline.training.engine`` checks it before training
(:func:`check_document_isolation`): each document of a probe batch must get
the same logits packed as alone, or the run is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers

from cpt_core.errors import UserError

from ..losses.head import final_hidden

VARLEN_FROM_ONE_ROW = ("flash_attention_2", "flash_attention_3")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}  # relative to the largest logit


class DocumentLeak(UserError):
    """Packed documents see each other with this attention implementation and transformers version."""


def forward_packed(
    model: Callable[..., Any],
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attn_implementation: str,
    hidden: bool = False,
) -> torch.Tensor:
    """Logits ``[B, L, V]`` of packed rows, with attention kept inside each document.

    With ``hidden``: the final hidden states ``[B, L, H]`` instead (the decoder's output, what ``lm_head``
    reads; :func:`pipeline.losses.head.final_hidden`), for a loss that applies the head itself.
    """
    rows, length = input_ids.shape
    if attn_implementation in VARLEN_FROM_ONE_ROW and rows > 1:
        input_ids, position_ids = input_ids.reshape(1, rows * length), position_ids.reshape(1, -1)
    if not hidden:
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        return out.logits.view(rows, length, -1)
    return final_hidden(model, input_ids=input_ids, position_ids=position_ids).view(rows, length, -1)


def isolation_error(
    model: Callable[..., Any],
    attn_implementation: str,
    vocab_size: int,
    micro_batch: int,
    device: torch.device | str = "cpu",
) -> float:
    """Largest |packed − alone| logit difference over a probe batch, relative to the largest logit.

    Every rank runs the same forwards in the same order (ZeRO-3 gathers parameters collectively).
    """
    g = torch.Generator().manual_seed(0)
    length = 24
    splits = [[7, 17], [11, 5, 8], [24], [3, 21]]
    ids = torch.randint(4, vocab_size, (micro_batch, length), generator=g).to(device)
    positions = torch.empty_like(ids)
    docs: list[tuple[int, int, int]] = []  # (row, start, length)
    for row in range(micro_batch):
        start = 0
        for n in splits[row % len(splits)]:
            positions[row, start : start + n] = torch.arange(n)
            docs.append((row, start, n))
            start += n
    with torch.no_grad():
        packed = forward_packed(model, ids, positions, attn_implementation).float()
        worst = scale = 0.0
        for row, start, n in docs:
            alone = model(
                input_ids=ids[row : row + 1, start : start + n],
                position_ids=torch.arange(n, device=ids.device).unsqueeze(0),
                use_cache=False,
            ).logits.float()
            worst = max(worst, float((packed[row, start : start + n] - alone[0]).abs().max()))
            scale = max(scale, float(alone.abs().max()))
    return worst / max(scale, 1e-6)


def check_document_isolation(
    model: Callable[..., Any],
    attn_implementation: str,
    vocab_size: int,
    micro_batch: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> float:
    """Refuse to train when packed documents would attend to each other; returns the measured error."""
    error = isolation_error(model, attn_implementation, vocab_size, micro_batch, device)
    if error > TOLERANCE.get(dtype, 3e-2):
        raise DocumentLeak(
            f"model.attn_implementation '{attn_implementation}' with transformers {transformers.__version__} lets "
            f"packed documents attend to each other (logits packed vs alone differ by {error:.2g} of the largest "
            f"logit at {micro_batch} rows a forward); use sdpa or eager with transformers >= 5.23, or micro_batch 1 "
            "(and replay.forward separate)"
        )
    return error
