"""Arrow schemas of everything data prep writes; the training side reads exactly these.

Packed row (mixture and per-source chunks):
    input_ids  fixed_size_list<int32>[seq_len]
    loss_mask  fixed_size_list<uint8>[seq_len]   1 where the token's prediction carries loss
    doc_lens   list<int32>                       segment lengths, summing to seq_len
    role       string                            domain | general | instruction
    source     string                            the source's name
Document-level rows (replay shard, holdout splits):
    id         string                            stable: "<source>:<content hash>"
    input_ids  list<int32>                       one document alone (+ EOS if it fits)
    loss_mask  list<uint8>
"""

from __future__ import annotations

import pyarrow as pa


def packed_schema(seq_len: int) -> pa.Schema:
    return pa.schema(
        [
            ("input_ids", pa.list_(pa.int32(), seq_len)),
            ("loss_mask", pa.list_(pa.uint8(), seq_len)),
            ("doc_lens", pa.list_(pa.int32())),
            ("role", pa.string()),
            ("source", pa.string()),
        ]
    )


DOCUMENT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("loss_mask", pa.list_(pa.uint8())),
    ]
)

# One entry per accepted document of a chunk: what stats, overlap checks and histograms need.
DOC_INDEX_SCHEMA = pa.schema(
    [
        ("digest", pa.uint64()),
        ("n_tokens", pa.int32()),
        ("holdout", pa.bool_()),
    ]
)


def write_ipc_file(path: str, table: pa.Table) -> None:
    """Arrow IPC *file* format: random access and cheap memory mapping for the cache."""
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_ipc_file(path: str) -> pa.Table:
    with pa.memory_map(path) as source:
        return pa.ipc.open_file(source).read_all()
