"""Packing into rows of exactly ``seq_len`` tokens, with document boundaries kept.

Pretraining documents are concatenated, each followed by EOS, and cut every
``seq_len`` tokens; a document cut at a row edge continues as a new segment of
the next row. ``doc_lens`` lists each row's segment lengths (summing to
``seq_len``) so training can keep attention inside a document. The tokens
after the last full row are dropped and counted: builds pack per chunk of
documents, so that costs < seq_len tokens per chunk (~0.1% at the defaults).

Instruction examples are never cut: they are placed whole, in order, and a
row that cannot take the next example is filled with EOS padding that carries
no loss (its own segment). An example longer than ``seq_len`` is rejected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class PackedRows:
    """Rows of one chunk: ``input_ids``/``loss_mask`` are ``[rows, seq_len]``."""

    input_ids: np.ndarray
    loss_mask: np.ndarray
    doc_lens: list[list[int]]
    dropped_tokens: int = 0
    padding_tokens: int = 0
    too_long: list[int] = field(default_factory=list)  # indices of examples that could not fit

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> PackedRows:
    """Concatenate ``doc + [EOS]`` for every doc and cut into full rows."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    flat = np.empty(total, dtype=np.int32)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for d, s, e in zip(docs, starts, ends):
        flat[s:e - 1] = d
        flat[e - 1] = eos_id
    n_rows = total // seq_len
    used = n_rows * seq_len
    input_ids = flat[:used].reshape(n_rows, seq_len)
    doc_lens = _segments_per_row(ends, n_rows, seq_len)
    return PackedRows(input_ids, np.ones_like(input_ids, dtype=np.uint8), doc_lens, dropped_tokens=total - used)


def _segments_per_row(doc_ends: np.ndarray, n_rows: int, seq_len: int) -> list[list[int]]:
    """Split the document end offsets at row edges into per-row segment lengths."""
    out: list[list[int]] = []
    for r in range(n_rows):
        lo, hi = r * seq_len, (r + 1) * seq_len
        i, j = np.searchsorted(doc_ends, [lo, hi], side="right")
        cuts = np.concatenate(([lo], doc_ends[i:j], [] if j and doc_ends[j - 1] == hi else [hi]))
        out.append(np.diff(cuts).astype(int).tolist())
    return out


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
                  pad_id: int) -> PackedRows:
    """Place whole ``(ids, loss_mask)`` examples into rows in order; pad the unfillable rest."""
    rows_ids: list[np.ndarray] = []
    rows_mask: list[np.ndarray] = []
    doc_lens: list[list[int]] = []
    too_long: list[int] = []
    ids_buf = np.full(seq_len, pad_id, dtype=np.int32)
    mask_buf = np.zeros(seq_len, dtype=np.uint8)
    segs: list[int] = []
    fill = padding = 0

    def flush() -> None:
        nonlocal fill, padding, segs, ids_buf, mask_buf
        if fill < seq_len:
            segs.append(seq_len - fill)
            padding += seq_len - fill
        rows_ids.append(ids_buf)
        rows_mask.append(mask_buf)
        doc_lens.append(segs)
        ids_buf = np.full(seq_len, pad_id, dtype=np.int32)
        mask_buf = np.zeros(seq_len, dtype=np.uint8)
        segs, fill = [], 0

    for k, (ids, mask) in enumerate(examples):
        n = len(ids)
        if n > seq_len:
            too_long.append(k)
            continue
        if fill + n > seq_len:
            flush()
        ids_buf[fill:fill + n] = ids
        mask_buf[fill:fill + n] = mask
        segs.append(n)
        fill += n
    if fill:
        flush()
    if rows_ids:
        input_ids, loss_mask = np.stack(rows_ids), np.stack(rows_mask)
    else:
        input_ids = np.zeros((0, seq_len), np.int32)
        loss_mask = np.zeros((0, seq_len), np.uint8)
    return PackedRows(input_ids, loss_mask, doc_lens, padding_tokens=padding, too_long=too_long)
