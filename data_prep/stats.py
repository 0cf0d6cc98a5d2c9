"""stats / inspect: what is in a build or a mixture, and what row i says when decoded."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cpt_core.errors import UserError

from .build import BUILD_MARKER, chunk_tables
from .tokenizer import Tokenizer


def open_rows(path: str | Path) -> pa.Table:
    """The packed rows of a mixture dir, its ``data`` dir, or a build dir, memory-mapped."""
    p = Path(path)
    if (p / BUILD_MARKER).is_file():
        return pa.concat_tables(list(chunk_tables(p, "rows")))
    data = p / "data" if (p / "data" / "state.json").is_file() else p
    if not (data / "state.json").is_file():
        raise UserError(f"{path}: neither a mixture, a saved dataset nor a complete build")
    state = json.loads((data / "state.json").read_text())
    tables = [pa.ipc.open_stream(pa.memory_map(str(data / f["filename"]))).read_all() for f in state["_data_files"]]
    return pa.concat_tables(tables)


def summarize(path: str | Path) -> dict[str, Any]:
    """Rows and tokens by role and source, achieved shares, segment-length histogram."""
    table = open_rows(path)
    if "doc_lens" not in table.column_names:
        raise UserError(f"{path}: not packed rows (no doc_lens column); stats reads builds and mixtures")
    seq_len = table.schema.field("input_ids").type.list_size
    roles = Counter(table.column("role").to_pylist())
    sources = Counter(zip(table.column("source").to_pylist(), table.column("role").to_pylist()))
    seg = pc.list_flatten(table.column("doc_lens")).to_numpy()
    loss = int(np.asarray(pc.list_flatten(table.column("loss_mask")).to_numpy(), dtype=np.int64).sum())
    n = table.num_rows
    edges = sorted({2**k for k in range(int(np.log2(seq_len)) + 1)} | {seq_len + 1})
    hist = np.histogram(seg, bins=edges)[0].tolist() if len(seg) else [0] * (len(edges) - 1)
    return {
        "rows": n,
        "seq_len": seq_len,
        "tokens": n * seq_len,
        "loss_tokens": loss,
        "rows_by_role": dict(roles),
        "token_share_by_role": {r: c / n for r, c in roles.items()},
        "rows_by_source": {f"{s} ({r})": c for (s, r), c in sources.items()},
        "segments": int(len(seg)),
        "segment_len_histogram": {f"[{lo},{hi})": c for lo, hi, c in zip(edges, edges[1:], hist)},
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"rows {s['rows']:,} × seq_len {s['seq_len']} = {s['tokens']:,} tokens ({s['loss_tokens']:,} with loss)",
        "",
        f"{'role':<14}{'rows':>10}{'share':>10}",
    ]
    lines += [
        f"{r:<14}{s['rows_by_role'][r]:>10,}{s['token_share_by_role'][r]:>10.4f}" for r in sorted(s["rows_by_role"])
    ]
    lines += ["", f"{'source':<30}{'rows':>10}"] + [f"{k:<30}{v:>10,}" for k, v in sorted(s["rows_by_source"].items())]
    lines += ["", f"document segments per row-length bucket ({s['segments']:,} segments)"]
    peak = max(s["segment_len_histogram"].values() or [1]) or 1
    for bucket, count in s["segment_len_histogram"].items():
        lines.append(f"{bucket:>14} {count:>9,} {'#' * round(40 * count / peak)}")
    return "\n".join(lines)


def inspect_row(path: str | Path, index: int, tokenizer: Tokenizer) -> str:
    """Decode row ``index``: one block per document segment; tokens without loss shown in ⟦ ⟧."""
    table = open_rows(path)
    if not 0 <= index < table.num_rows:
        raise UserError(f"{path}: row {index} out of range (0..{table.num_rows - 1})")
    row = table.slice(index, 1).to_pylist()[0]
    out = [f"row {index}: role={row['role']} source={row['source']} segments={row['doc_lens']}"]
    start = 0
    for k, n in enumerate(row["doc_lens"]):
        ids, mask = row["input_ids"][start : start + n], row["loss_mask"][start : start + n]
        out.append(f"--- segment {k}: {n} tokens, {sum(mask)} with loss")
        out.append(_render_runs(ids, mask, tokenizer))
        start += n
    return "\n".join(out)


def _render_runs(ids: list[int], mask: list[int], tokenizer: Tokenizer) -> str:
    parts, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j] == mask[i]:
            j += 1
        text = tokenizer.decode(ids[i:j])
        parts.append(text if mask[i] else f"⟦{text}⟧")
        i = j
    return "".join(parts)
