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

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PackedRows:
    """Rows of one chunk: ``input_ids``/``loss_mask`` are ``[rows, seq_len]``.

    Segment lengths are kept flat (``seg_lengths``) with per-row ``seg_offsets``,
    which is exactly Arrow's list layout: no per-row Python lists on the hot path.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    seg_offsets: np.ndarray  # [rows + 1], int32
    seg_lengths: np.ndarray  # [segments], int32
    dropped_tokens: int = 0
    padding_tokens: int = 0
    too_long: list[int] = field(default_factory=list)  # indices of examples that could not fit

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def doc_lens(self) -> list[list[int]]:
        flat = self.seg_lengths.tolist()
        return [flat[a:b] for a, b in zip(self.seg_offsets[:-1].tolist(), self.seg_offsets[1:].tolist())]


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> PackedRows:
    """Concatenate ``doc + [EOS]`` for every doc and cut into full rows."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    total = int(lengths.sum())
    flat = np.empty(total, dtype=np.int32)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for d, s, e in zip(docs, starts, ends):
        flat[s : e - 1] = d
        flat[e - 1] = eos_id
    n_rows = total // seq_len
    used = n_rows * seq_len
    input_ids = flat[:used].reshape(n_rows, seq_len)
    offsets, seg_lengths = _segments_per_row(ends, n_rows, seq_len)
    return PackedRows(
        input_ids, np.ones_like(input_ids, dtype=np.uint8), offsets, seg_lengths, dropped_tokens=total - used
    )


def _segments_per_row(doc_ends: np.ndarray, n_rows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the document end offsets at row edges: (per-row offsets, flat segment lengths)."""
    used = n_rows * seq_len
    row_edges = np.arange(1, n_rows + 1, dtype=np.int64) * seq_len
    cuts = np.union1d(doc_ends[doc_ends <= used], row_edges)  # sorted, each edge once
    lengths = np.diff(cuts, prepend=0)
    per_row = np.searchsorted(row_edges, cuts, side="left")  # a cut at a row edge closes that row
    bounds = np.searchsorted(per_row, np.arange(n_rows + 1), side="left")
    return bounds.astype(np.int32), lengths.astype(np.int32)


def pack_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int, pad_id: int) -> PackedRows:
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
        ids_buf[fill : fill + n] = ids
        mask_buf[fill : fill + n] = mask
        segs.append(n)
        fill += n
    if fill:
        flush()
    if rows_ids:
        input_ids, loss_mask = np.stack(rows_ids), np.stack(rows_mask)
    else:
        input_ids = np.zeros((0, seq_len), np.int32)
        loss_mask = np.zeros((0, seq_len), np.uint8)
    offsets = np.cumsum([0] + [len(segs) for segs in doc_lens], dtype=np.int64).astype(np.int32)
    lengths = np.array([n for segs in doc_lens for n in segs], dtype=np.int32)
    return PackedRows(input_ids, loss_mask, offsets, lengths, padding_tokens=padding, too_long=too_long)
