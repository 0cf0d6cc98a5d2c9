"""mix: packed per-source builds → one training mixture at exact, stratified token shares.

Every row holds ``seq_len`` tokens, so token shares are row shares. The role of
each position comes from a Bresenham sequence: the general count among the
first k rows is round(k·r), hence any window of B consecutive rows — every
global batch, wherever it starts — holds floor(B·r) or ceil(B·r) general rows.
The instruction share is laid the same way over the non-general positions
(within two rows of the request per batch). Rows within a role follow a seeded
permutation; every domain row is used once; general/instruction rows are drawn
without replacement, and reused in further permutations only if too few exist
(a warning says how often). The order is final: training must not reshuffle.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cpt_core.atomic import write_json
from cpt_core.errors import UserError
from cpt_core.progress import progress_bar

from . import __version__
from .arrow_dataset import write_dataset_dir
from .build import chunk_tables, load_build
from .schema import packed_schema

log = logging.getLogger(__name__)

ROLE_CODES = {"domain": 0, "general": 1, "instruction": 2}
SHARD_BYTES = 256 << 20


def stratified_roles(n: int, general_ratio: float, instruction_ratio: float = 0.0) -> np.ndarray:
    """Role code per position (0 domain, 1 general, 2 instruction), spread evenly (Bresenham)."""

    def spread(count: int, ratio: float) -> np.ndarray:
        ideal = np.floor(np.arange(count + 1) * ratio + 0.5)
        return np.diff(ideal).astype(bool)

    roles = np.zeros(n, dtype=np.int8)
    general = spread(n, general_ratio)
    roles[general] = 1
    if instruction_ratio > 0:
        rest = np.flatnonzero(~general)
        roles[rest[spread(len(rest), instruction_ratio / (1.0 - general_ratio))]] = 2
    return roles


def max_batch_deviation(roles: np.ndarray, role: int, ratio: float, batch_rows: int) -> float:
    """Largest |count - B·r| of ``role`` over every window of ``batch_rows`` consecutive rows."""
    if len(roles) < batch_rows:
        return 0.0
    c = np.concatenate(([0], np.cumsum(roles == role)))
    counts = c[batch_rows:] - c[:-batch_rows]
    return float(np.max(np.abs(counts - batch_rows * ratio)))


def mix(
    build_dirs: list[str],
    out_dir: str | os.PathLike[str],
    general_ratio: float,
    instruction_ratio: float = 0.0,
    seed: int = 1234,
    batch_rows: int = 64,
    quiet: bool = False,
) -> dict[str, Any]:
    """Write the mixture to ``out_dir`` (a saved dataset) with ``manifest.json``; returns the manifest."""
    _check_ratio("--general-ratio", general_ratio)
    _check_ratio("--instruction-ratio", instruction_ratio)
    if general_ratio + instruction_ratio >= 1.0:
        raise UserError(
            f"general ({general_ratio}) + instruction ({instruction_ratio}) ratios must leave room "
            "for domain data (sum < 1)"
        )
    if batch_rows < 1:
        raise UserError(f"--batch-rows must be >= 1, got {batch_rows}")
    builds = [load_build(d) for d in build_dirs]
    if not builds:
        raise UserError("mix needs at least one build directory")
    _check_compatible(builds)
    seq_len = builds[0]["seq_len"]
    available = {r: sum(b["rows"] for b in builds if b["role"] == r) for r in ROLE_CODES}
    requested = {"general": general_ratio, "instruction": instruction_ratio}
    if available["domain"] == 0:
        raise UserError("no domain rows: give at least one built domain source with data")
    for role, ratio in requested.items():
        if ratio > 0 and available[role] == 0:
            raise UserError(f"{role} ratio {ratio} requested but no {role} source rows were given")

    n = math.floor(available["domain"] / (1.0 - general_ratio - instruction_ratio) + 1e-9)
    roles = stratified_roles(n, general_ratio, instruction_ratio)
    while int((roles == 0).sum()) > available["domain"]:  # rounding may ask for one domain row too many
        n -= 1
        roles = stratified_roles(n, general_ratio, instruction_ratio)

    tables, offsets_by_role = _row_spaces(builds)
    rng = np.random.default_rng(seed)
    picks: dict[int, np.ndarray] = {}
    reuse: dict[str, float] = {}
    for role, code in ROLE_CODES.items():
        need = int((roles == code).sum())
        pool = offsets_by_role[role]
        picks[code] = _draw(pool, need, rng) if need else np.zeros(0, np.int64)
        reuse[role] = need / len(pool) if len(pool) else 0.0
        if len(pool) and need > len(pool):
            log.warning("%s: only %d rows for %d positions; rows are reused %.2fx", role, len(pool), need, reuse[role])
    order = np.empty(n, dtype=np.int64)
    for code, rows in picks.items():
        order[roles == code] = rows

    everything = pa.concat_tables(tables) if tables else pa.table({})
    rows_per_shard = max(1, SHARD_BYTES // (seq_len * 5 + 64))
    num_shards = max(1, math.ceil(n / rows_per_shard))
    bar = progress_bar(desc="mix", unit="row", total=n, quiet=quiet)

    def shards() -> Iterator[pa.Table]:
        for s in range(num_shards):
            idx = order[s * rows_per_shard : (s + 1) * rows_per_shard]
            yield everything.take(pa.array(idx))
            bar.update(len(idx))

    try:
        written = write_dataset_dir(Path(out_dir) / "data", packed_schema(seq_len), shards(), num_shards)
    finally:
        bar.close()
    manifest = _manifest(builds, roles, picks, available, requested, reuse, seed, batch_rows, written, seq_len)
    for source in manifest["sources"]:  # relative, so a prep directory can be moved as a whole
        source["dir"] = os.path.relpath(source["dir"], out_dir)
    write_json(Path(out_dir) / "manifest.json", manifest)
    shares = manifest["achieved_token_share"]
    log.info(
        "mixture: %d rows × %d tokens; shares domain %.4f general %.4f instruction %.4f → %s",
        n,
        seq_len,
        shares["domain"],
        shares["general"],
        shares["instruction"],
        out_dir,
    )
    return manifest


def _check_ratio(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise UserError(f"{name} must be in [0, 1), got {value}")


def _check_compatible(builds: list[dict[str, Any]]) -> None:
    first = builds[0]
    for b in builds[1:]:
        if b["seq_len"] != first["seq_len"]:
            raise UserError(f"{b['dir']}: seq_len {b['seq_len']} differs from {first['dir']}'s {first['seq_len']}")
        if b["tokenizer_fingerprint"] != first["tokenizer_fingerprint"]:
            raise UserError(
                f"{b['dir']}: built with another tokenizer than {first['dir']} "
                f"({b['tokenizer_fingerprint']} vs {first['tokenizer_fingerprint']})"
            )
    names = [b["name"] for b in builds]
    if len(set(names)) != len(names):
        raise UserError(f"source names must be unique in a mixture, got {names}")


def _row_spaces(builds: list[dict[str, Any]]) -> tuple[list[pa.Table], dict[str, np.ndarray]]:
    """All chunk tables in one global row space, and each role's global row numbers."""
    tables: list[pa.Table] = []
    by_role: dict[str, list[np.ndarray]] = {r: [] for r in ROLE_CODES}
    start = 0
    for b in builds:
        for t in chunk_tables(b["dir"], "rows"):
            tables.append(t)
            by_role[b["role"]].append(np.arange(start, start + t.num_rows, dtype=np.int64))
            start += t.num_rows
    return tables, {r: np.concatenate(v) if v else np.zeros(0, np.int64) for r, v in by_role.items()}


def _draw(pool: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
    """``need`` rows: whole seeded permutations of ``pool`` until enough, the last one cut."""
    parts, left = [], need
    while left > 0:
        perm = pool[rng.permutation(len(pool))]
        parts.append(perm[:left])
        left -= len(parts[-1])
    return np.concatenate(parts)


def _manifest(
    builds: list[dict[str, Any]],
    roles: np.ndarray,
    picks: dict[int, np.ndarray],
    available: dict[str, int],
    requested: dict[str, float],
    reuse: dict[str, float],
    seed: int,
    batch_rows: int,
    written: list[dict[str, Any]],
    seq_len: int,
) -> dict[str, Any]:
    n = len(roles)
    counts = {r: int((roles == c).sum()) for r, c in ROLE_CODES.items()}
    ratio = {
        "general": requested["general"],
        "instruction": requested["instruction"],
        "domain": 1.0 - requested["general"] - requested["instruction"],
    }
    return {
        "version": __version__,
        "seed": seed,
        "seq_len": seq_len,
        "rows": n,
        "tokens": n * seq_len,
        "tokenizer_fingerprint": builds[0]["tokenizer_fingerprint"],
        "document_start_ids": builds[0]["document_start_ids"],
        "requested_token_share": ratio,
        "achieved_token_share": {r: (counts[r] / n if n else 0.0) for r in ROLE_CODES},
        "rows_by_role": counts,
        "rows_available_by_role": available,
        "reuse_factor_by_role": {r: round(v, 4) for r, v in reuse.items()},
        "order": {
            "kind": "stratified",
            "batch_rows_checked": batch_rows,
            "max_deviation_rows": {
                r: max_batch_deviation(roles, c, ratio[r], batch_rows) for r, c in ROLE_CODES.items()
            },
            "note": "rows are in training order; do not reshuffle",
        },
        "sources": [
            {
                k: b[k]
                for k in (
                    "name",
                    "role",
                    "dir",
                    "inputs",
                    "records",
                    "duplicates",
                    "rejects",
                    "rejects_by_reason",
                    "docs_train",
                    "docs_holdout",
                    "tokens_train",
                    "rows",
                    "dropped_tokens",
                    "padding_tokens",
                    "special_token_literals",
                )
            }
            for b in builds
        ],
        "shards": written,
    }
