"""build: one source → tokenized, packed Arrow chunks in a reusable cache.

How it stays deterministic, resumable and splittable:
  * one process reads the source in a fixed order (cheap: parse, validate,
    dedup, holdout split) and cuts the accepted documents into chunks of
    ``docs_per_chunk``;
  * each chunk is tokenized and packed on its own (by a worker process, or by a
    job of a K-piece split that owns chunks ``id % K == index``) and written as
    a directory renamed into place when complete;
  * a rerun skips finished chunks; ``finalize`` writes ``build.json`` only once
    every chunk is there, and that file is what marks the build complete.
So the bytes of every chunk depend on the source, tokenizer and options alone,
never on the number of workers or pieces. The cache directory name is a key
over exactly those inputs: re-mixing at another ratio never re-tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cpt_core.atomic import atomic_path, remove_stale_temporaries, sha256_file, write_json
from cpt_core.errors import RejectLimitExceeded, UserError
from cpt_core.progress import progress_bar
from cpt_core.typed_config import setting

from . import __version__
from .documents import ROLES, Document, Reject
from .instruct import encode_examples
from .packing import PackedRows, pack_documents, pack_examples
from .readers import ReadOptions, read_documents, resolve_inputs
from .schema import DOC_INDEX_SCHEMA, DOCUMENT_SCHEMA, packed_schema, read_ipc_file, write_ipc_file
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

BUILD_MARKER = "build.json"
READER_STATS = "reader.json"


@dataclass(frozen=True)
class SourceSpec:
    """One input source and how to turn it into packed rows."""

    name: str
    role: str
    paths: tuple[str, ...]
    read: ReadOptions = ReadOptions()
    dedup: bool = True
    holdout_fraction: float = 0.01  # of documents, chosen by content hash, never packed into train
    holdout_max_docs: int = 1000
    reserved: frozenset[int] = frozenset()  # digests of documents kept for the replay shard: never packed

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise UserError(f"source '{self.name}': role must be one of {ROLES}, got '{self.role}'")
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise UserError(f"source name '{self.name}': use letters, digits, '-', '_' or '.'")
        if not self.paths:
            raise UserError(f"source '{self.name}': no input paths given")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise UserError(f"source '{self.name}': holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.read.instruction != (self.role == "instruction"):
            object.__setattr__(
                self, "read", ReadOptions(**{**asdict(self.read), "instruction": self.role == "instruction"})
            )


class HoldoutSplit:
    """Which documents a source holds out for eval, decided in one pass over its documents in stream order.

    A document is held out when a seeded hash of its content falls below ``fraction`` and fewer than
    ``max_docs`` have been held out before it. The build and the replay sampler both walk the source with
    one of these, so the replay shard can avoid the holdout without reading the build.
    """

    def __init__(self, fraction: float, max_docs: int, seed: int) -> None:
        self.cut, self.max_docs, self.taken = int(fraction * 2**32), max_docs, 0
        self.salt = seed.to_bytes(8, "little", signed=True)

    @classmethod
    def of(cls, spec: SourceSpec, seed: int) -> HoldoutSplit:
        return cls(spec.holdout_fraction, spec.holdout_max_docs, seed)

    def held(self, digest: int) -> bool:
        """Call once per document the build would split (after dedup), in stream order."""
        keyed = int.from_bytes(
            hashlib.blake2b(digest.to_bytes(8, "little"), digest_size=4, key=self.salt).digest(), "little"
        )
        held = keyed < self.cut and self.taken < self.max_docs
        self.taken += held
        return held


@dataclass(frozen=True)
class BuildOptions:
    """Options that shape the output (all part of the cache key) and limits that guard it."""

    seq_len: int = setting(2048, "tokens per packed row")
    seed: int = setting(1234, "seed of the holdout split, the row order and the replay sample")
    docs_per_chunk: int = setting(1024, "documents per independently packed (and cached) chunk")
    chunk_chars: int = setting(4_000_000, "a chunk also ends here: ~1M tokens, so the dropped tail is < 0.2% at 2048")
    max_reject_fraction: float = setting(0.01, "fail when more than this share of records is rejected")

    def __post_init__(self) -> None:
        if self.seq_len <= 1:
            raise UserError(f"seq_len must be > 1, got {self.seq_len}")
        if self.docs_per_chunk < 1 or self.chunk_chars < 1:
            raise UserError(
                f"docs_per_chunk and chunk_chars must be >= 1, got {self.docs_per_chunk}, {self.chunk_chars}"
            )
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise UserError(f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction}")


@dataclass
class ChunkJob:
    """The documents of one chunk, shipped to a worker."""

    index: int
    out_dir: str
    source: str
    role: str
    seq_len: int
    tokenizer_path: str
    texts: list[Any]  # str for pretraining, tuple of (role, content) for instruction
    digests: list[int]
    holdout: list[bool]
    where: list[tuple[str, int]] = field(default_factory=list)  # (path, line) for worker-side rejects


def build_source(
    spec: SourceSpec,
    options: BuildOptions,
    tokenizer_path: str,
    cache_dir: str | os.PathLike[str],
    workers: int = 1,
    num_shards: int = 1,
    shard_index: int = 0,
    quiet: bool = False,
) -> Path:
    """Build (or resume, or reuse) the cache for ``spec``; returns its directory.

    With ``num_shards > 1`` only this piece's chunks are made; the directory is
    complete (``build.json``) once the last piece, or ``finalize``, sees them all.
    """
    if not 0 <= shard_index < num_shards:
        raise UserError(f"--shard-index must be in [0, {num_shards}), got {shard_index}")
    files = resolve_inputs(spec.paths)
    tokenizer = load_tokenizer(tokenizer_path)
    inputs = [{"path": f, "sha256": _checksum(f)} for f in files]
    out_dir = Path(cache_dir) / spec.role / f"{spec.name}-{_cache_key(spec, options, tokenizer, inputs)}"
    if (out_dir / BUILD_MARKER).is_file():
        log.info("%s: cached build found at %s, nothing to do", spec.name, out_dir)
        return out_dir
    (out_dir / "chunks").mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(out_dir / "chunks")
    if num_shards == 1:  # the only writer here (pieces of a split build run side by side: leave theirs alone)
        stale += remove_stale_temporaries(out_dir)
    if stale:
        log.info("%s: removed %d unfinished file(s) of an earlier, interrupted run", spec.name, stale)
    write_json(
        out_dir / "spec.json",
        {
            "spec": _spec_json(spec),
            "options": asdict(options),
            "tokenizer": {
                "path": str(tokenizer_path),
                "fingerprint": tokenizer.fingerprint,
                "bos_ids": list(tokenizer.bos_ids),
            },
            "inputs": inputs,
            "version": __version__,
        },
    )
    reader_stats = _run_chunks(spec, options, files, tokenizer_path, out_dir, workers, num_shards, shard_index, quiet)
    write_json(out_dir / READER_STATS, reader_stats)
    if _missing_chunks(out_dir, reader_stats["num_chunks"]):
        log.info(
            "%s: piece %d/%d done; run `data_prep merge %s` once every piece has finished",
            spec.name,
            shard_index + 1,
            num_shards,
            out_dir,
        )
        return out_dir
    finalize(out_dir)
    return out_dir


def finalize(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every chunk is present, aggregate stats and rejects, write ``build.json``."""
    out_dir = Path(out_dir)
    if not (out_dir / READER_STATS).is_file():
        raise UserError(f"{out_dir}: not a build directory (no {READER_STATS}); run `data_prep build` first")
    reader = json.loads((out_dir / READER_STATS).read_text())
    spec = json.loads((out_dir / "spec.json").read_text())
    missing = _missing_chunks(out_dir, reader["num_chunks"])
    if missing:
        raise UserError(
            f"{out_dir}: {len(missing)} chunk(s) not built yet (first: {missing[0]}); "
            "run the remaining build pieces first"
        )
    totals: Counter[str] = Counter()
    rejects = list(reader["rejects"])
    chunks = []
    for i in range(reader["num_chunks"]):
        stats = json.loads((_chunk_dir(out_dir, i) / "stats.json").read_text())
        totals.update({k: v for k, v in stats.items() if isinstance(v, int)})
        rejects.extend(stats["rejects"])
        chunks.append({"index": i, "rows": stats["rows"]})
    records = reader["records"]
    reasons = Counter(_reason_kind(r["reason"]) for r in rejects)
    with atomic_path(out_dir / "rejects.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects), encoding="utf-8")
    fraction = len(rejects) / max(records, 1)
    max_fraction = spec["options"]["max_reject_fraction"]
    if fraction > max_fraction:
        raise RejectLimitExceeded(
            f"{spec['spec']['name']}: {len(rejects)} of {records} records rejected ({fraction:.2%} > "
            f"max_reject_fraction {max_fraction:.2%}); see {out_dir / 'rejects.jsonl'} "
            f"(by reason: {dict(reasons)}). Fix the input or raise --max-reject-fraction."
        )
    summary = {
        "name": spec["spec"]["name"],
        "role": spec["spec"]["role"],
        "seq_len": spec["options"]["seq_len"],
        "tokenizer_fingerprint": spec["tokenizer"]["fingerprint"],
        "inputs": spec["inputs"],
        # every document starts with these ids, as the tokenizer starts a text (BOS, or nothing)
        "document_start_ids": spec["tokenizer"]["bos_ids"],
        # control-token strings written in raw text, encoded as text (not as the control ids)
        "special_token_literals": totals["special_token_literals"],
        "records": records,
        "duplicates": reader["duplicates"],
        "rejects": len(rejects),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "docs_train": totals["docs_train"],
        "docs_holdout": totals["docs_holdout"],
        "docs_reserved_for_replay": reader.get("reserved", 0),
        "tokens_train": totals["tokens_train"],
        "tokens_holdout": totals["tokens_holdout"],
        "loss_tokens": totals["loss_tokens"],
        "rows": totals["rows"],
        "dropped_tokens": totals["dropped_tokens"],
        "padding_tokens": totals["padding_tokens"],
        "chunks": chunks,
        "version": __version__,
    }
    write_json(out_dir / BUILD_MARKER, summary)
    log.info(
        "%s: %d rows of %d tokens from %d documents (%d duplicates, %d rejected, %d held out) → %s",
        summary["name"],
        summary["rows"],
        summary["seq_len"],
        summary["docs_train"],
        reader["duplicates"],
        len(rejects),
        summary["docs_holdout"],
        out_dir,
    )
    if rejects:  # a warning, so -q still says it: a rejected record is data the user thought was in
        log.warning(
            "%s: %d of %d records rejected (%s); each with file, line and reason in %s",
            summary["name"],
            len(rejects),
            records,
            ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())),
            out_dir / "rejects.jsonl",
        )
    return summary


def load_build(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``build.json`` of a complete build, with a clear error otherwise."""
    marker = Path(path) / BUILD_MARKER
    if not marker.is_file():
        raise UserError(f"{path}: not a complete build (no {BUILD_MARKER}); finish `data_prep build`/`merge` first")
    summary = json.loads(marker.read_text())
    summary["dir"] = str(path)
    return summary


def chunk_tables(build_dir: str | os.PathLike[str], name: str) -> Iterator[pa.Table]:
    """Memory-mapped tables of one kind (rows, docs, holdout) over a build's chunks, in order."""
    summary = load_build(build_dir)
    for chunk in summary["chunks"]:
        yield read_ipc_file(str(_chunk_dir(Path(build_dir), chunk["index"]) / f"{name}.arrow"))


# --- reading side: runs in the main process ----------------------------------------------------------


def _run_chunks(
    spec: SourceSpec,
    options: BuildOptions,
    files: list[str],
    tokenizer_path: str,
    out_dir: Path,
    workers: int,
    num_shards: int,
    shard_index: int,
    quiet: bool,
) -> dict[str, Any]:
    done = {int(p.name) for p in (out_dir / "chunks").iterdir() if p.name.isdigit()}
    if done:
        log.info("%s: resuming, %d chunk(s) already built", spec.name, len(done))
    rejects: list[dict[str, Any]] = []
    seen: set[int] = set()
    counts = Counter(records=0, duplicates=0, reserved=0)
    split = HoldoutSplit.of(spec, options.seed)
    tokens_done = 0
    started = time.perf_counter()
    bar = progress_bar(desc=f"build {spec.name}", unit="doc", quiet=quiet)
    # Tokenizing happens in worker processes even for workers=1, so reading overlaps with it;
    # workers=0 runs everything inline (for debugging and profiling).
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_quiet_worker) if workers > 0 else None
    pending: list[Future[dict[str, Any]]] = []

    def collect(block: bool) -> None:
        nonlocal tokens_done
        while pending and (block or pending[0].done() or len(pending) >= 2 * max(workers, 1)):
            stats = pending.pop(0).result()
            tokens_done += stats["tokens_train"] + stats["tokens_holdout"]
            bar.set_postfix(tok_s=f"{tokens_done / (time.perf_counter() - started):,.0f}", refresh=False)

    def submit(job: ChunkJob) -> None:
        if job.index % num_shards != shard_index or job.index in done:
            return
        pending.append(pool.submit(process_chunk, job) if pool else _completed(process_chunk(job)))
        collect(block=False)

    def new_job(index: int) -> ChunkJob:
        return ChunkJob(index, str(out_dir), spec.name, spec.role, options.seq_len, tokenizer_path, [], [], [])

    job = new_job(0)
    chars = 0
    try:
        for item in read_documents(files, spec.read):
            counts["records"] += 1
            bar.update(1)
            if isinstance(item, Reject):
                rejects.append(item.to_json())
                continue
            if spec.dedup:
                if item.digest in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(item.digest)
            held = split.held(item.digest)
            if item.digest in spec.reserved:
                if held:  # the replay sampler walks the same split and skips held-out documents
                    raise UserError(f"source '{spec.name}': a document reserved for replay is also held out")
                counts["reserved"] += 1
                continue
            chars += _append(job, item, held)
            if len(job.texts) == options.docs_per_chunk or chars >= options.chunk_chars:
                submit(job)
                job, chars = new_job(job.index + 1), 0
        if job.texts:
            submit(job)
            job = new_job(job.index + 1)
        collect(block=True)
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    if counts["records"] == 0:
        raise UserError(f"source '{spec.name}': inputs {list(spec.paths)} hold no records")
    return {
        "num_chunks": job.index,
        "records": counts["records"],
        "duplicates": counts["duplicates"],
        "reserved": counts["reserved"],
        "rejects": rejects,
    }


def _append(job: ChunkJob, doc: Document, held: bool) -> int:
    """Add ``doc`` to the chunk; returns its size in characters."""
    job.texts.append(doc.messages if doc.is_instruction else doc.text)
    job.digests.append(doc.digest)
    job.holdout.append(held)
    job.where.append((doc.path, doc.line))
    return len(doc.text) if doc.text is not None else sum(len(c) for _, c in doc.messages or ())


def _completed(result: dict[str, Any]) -> Future[dict[str, Any]]:
    f: Future[dict[str, Any]] = Future()
    f.set_result(result)
    return f


def _quiet_worker() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker, one core: parallelism comes from processes


# --- worker side --------------------------------------------------------------------------------------

_TOKENIZERS: dict[str, Tokenizer] = {}


def process_chunk(job: ChunkJob) -> dict[str, Any]:
    """Tokenize and pack one chunk, write it atomically, return its stats."""
    tokenizer = _TOKENIZERS.get(job.tokenizer_path) or _TOKENIZERS.setdefault(
        job.tokenizer_path, load_tokenizer(job.tokenizer_path)
    )
    rejects: list[dict[str, Any]] = []
    refused: set[int] = set()
    literals = 0
    if job.role == "instruction":
        # In a conversation the template's markup is control tokens, so a literal in a message would
        # become a real turn marker or EOS: such examples are refused (counted), never trained.
        for k, messages in enumerate(job.texts):
            found = sorted({t for _, content in messages for t in tokenizer.special_literals(content)})
            if found:
                refused.add(k)
                path, line = job.where[k]
                rejects.append(
                    Reject(
                        path,
                        line,
                        f"message text holds control-token literal(s) {found}; "
                        "the chat template would turn them into real control tokens",
                    ).to_json()
                )
        encoded = encode_examples(tokenizer, job.texts)
        ids_list = [ids for ids, _ in encoded]
        masks = [mask for _, mask in encoded]
    else:
        # Raw text keeps such literals as text (encode_batch); how often it happened goes in the manifest.
        literals = sum(len(tokenizer.special_literals(text)) for text in job.texts)
        ids_list = tokenizer.encode_batch(job.texts)
        masks = None
    train = [i for i, h in enumerate(job.holdout) if not h and i not in refused]
    if masks is not None:
        packed = pack_examples([(ids_list[i], masks[i]) for i in train], job.seq_len, tokenizer.eos_id)
        for k in packed.too_long:
            path, line = job.where[train[k]]
            rejects.append(
                Reject(
                    path,
                    line,
                    f"instruction example of {len(ids_list[train[k]])} tokens "
                    f"is longer than seq_len {job.seq_len}; examples are never cut",
                ).to_json()
            )
    else:
        packed = pack_documents([ids_list[i] for i in train], job.seq_len, tokenizer.eos_id)
    holdout_idx = [i for i, h in enumerate(job.holdout) if h and i not in refused]
    n_tokens = [len(ids) + (masks is None) for ids in ids_list]  # documents count their EOS
    stats = {
        "docs_train": len(train) - len(packed.too_long),
        "docs_holdout": len(holdout_idx),
        "tokens_train": sum(n_tokens[i] for i in train),
        "tokens_holdout": sum(n_tokens[i] for i in holdout_idx),
        "loss_tokens": int(packed.loss_mask.sum()),
        "rows": packed.num_rows,
        "dropped_tokens": packed.dropped_tokens,
        "padding_tokens": packed.padding_tokens,
        "special_token_literals": literals,
        "rejects": rejects,
    }
    final = _chunk_dir(Path(job.out_dir), job.index)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        write_ipc_file(str(tmp / "rows.arrow"), _rows_table(packed, job))
        write_ipc_file(
            str(tmp / "docs.arrow"),
            pa.table(
                {
                    "digest": pa.array(job.digests, pa.uint64()),
                    "n_tokens": pa.array(n_tokens, pa.int32()),
                    "holdout": pa.array(job.holdout, pa.bool_()),
                },
                schema=DOC_INDEX_SCHEMA,
            ),
        )
        write_ipc_file(
            str(tmp / "holdout.arrow"),
            pa.table(
                {
                    "id": [f"{job.source}:{job.digests[i]:016x}" for i in holdout_idx],
                    "input_ids": pa.array(
                        [ids_list[i] + ([] if masks else [tokenizer.eos_id]) for i in holdout_idx], pa.list_(pa.int32())
                    ),
                    "loss_mask": pa.array(
                        [masks[i] if masks else [1] * n_tokens[i] for i in holdout_idx], pa.list_(pa.uint8())
                    ),
                },
                schema=DOCUMENT_SCHEMA,
            ),
        )
        write_json(tmp / "stats.json", stats)
    return stats


def _rows_table(packed: PackedRows, job: ChunkJob) -> pa.Table:
    n, seq_len = packed.input_ids.shape
    ids = pa.FixedSizeListArray.from_arrays(pa.array(packed.input_ids.reshape(-1), pa.int32()), seq_len)
    mask = pa.FixedSizeListArray.from_arrays(pa.array(packed.loss_mask.reshape(-1), pa.uint8()), seq_len)
    doc_lens = pa.ListArray.from_arrays(
        pa.array(packed.seg_offsets, pa.int32()), pa.array(packed.seg_lengths, pa.int32())
    )
    return pa.table(
        [ids, mask, doc_lens, pa.array([job.role] * n, pa.string()), pa.array([job.source] * n, pa.string())],
        schema=packed_schema(seq_len),
    )


# --- helpers ------------------------------------------------------------------------------------------


def _chunk_dir(out_dir: Path, index: int) -> Path:
    return out_dir / "chunks" / f"{index:06d}"


def _missing_chunks(out_dir: Path, num_chunks: int) -> list[int]:
    return [i for i in range(num_chunks) if not (_chunk_dir(out_dir, i) / "stats.json").is_file()]


def _checksum(path: str) -> str:
    if os.path.isdir(path):
        h = hashlib.sha256()
        for f in sorted(Path(path).rglob("*")):
            if f.is_file():
                h.update(f.relative_to(path).as_posix().encode())
                h.update(sha256_file(f).encode())
        return h.hexdigest()
    return sha256_file(path)


def _spec_json(spec: SourceSpec) -> dict[str, Any]:
    d = asdict(spec)
    d["paths"] = list(spec.paths)
    d["reserved"] = len(spec.reserved)
    return d


def _digest_set_key(digests: frozenset[int]) -> str:
    return hashlib.sha256(np.array(sorted(digests), dtype=np.uint64).tobytes()).hexdigest()[:16]


def _cache_key(spec: SourceSpec, options: BuildOptions, tokenizer: Tokenizer, inputs: list[dict[str, str]]) -> str:
    keyed = {
        "inputs": [i["sha256"] for i in inputs],
        "tokenizer": tokenizer.fingerprint,
        "read": asdict(spec.read),
        "dedup": spec.dedup,
        "holdout": [spec.holdout_fraction, spec.holdout_max_docs],
        "role": spec.role,
        "seq_len": options.seq_len,
        "seed": options.seed,
        "docs_per_chunk": options.docs_per_chunk,
        "chunk_chars": options.chunk_chars,
        "format": 2,
    }
    if spec.reserved:  # only then: builds without a replay shard keep their cached key
        keyed["reserved"] = _digest_set_key(spec.reserved)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:12]


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary: 'malformed JSON: ... column 3' → 'malformed JSON', numbers → N."""
    head, _, rest = reason.partition(": ")
    if head.startswith(("field '", "message ")):  # "field 'text': is empty (…)" keeps its field
        head = f"{head}: {rest}"
    return re.sub(r"(?<![-\w])\d+", "N", head.split(" (")[0].split(";")[0])


def holdout_rows(build_dir: str | os.PathLike[str]) -> Iterator[pa.Table]:
    yield from chunk_tables(build_dir, "holdout")


def found_in_builds(digests: np.ndarray, build_dirs: list[str]) -> dict[str, int]:
    """How many of ``digests`` (uint64) the builds train on, and how many they hold out."""
    found = {}
    for part, holdout in (("train", False), ("holdout", True)):
        parts = [doc_digests(b, holdout=holdout) for b in build_dirs]
        found[part] = int(np.isin(digests, np.concatenate(parts) if parts else np.zeros(0, np.uint64)).sum())
    return found


def doc_digests(build_dir: str | os.PathLike[str], holdout: bool | None = None) -> np.ndarray:
    """Digests of a build's documents (train, holdout, or both) for overlap checks."""
    parts = []
    for t in chunk_tables(build_dir, "docs"):
        d = t.column("digest").to_numpy()
        if holdout is not None:
            d = d[t.column("holdout").to_numpy(zero_copy_only=False) == holdout]
        parts.append(d)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)
