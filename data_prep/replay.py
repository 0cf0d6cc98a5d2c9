"""replay: the GeRe replay shard — N general documents, each alone, truncated to ``replay_len``.

GeRe replays a fixed set (~1000) of general samples every step and holds the
model's final-layer activations on them. Each sample is one document's first
``replay_len`` tokens (+ EOS if it ends sooner), never packed with another, so
training sees exactly what the cache builder saw. Selection is a seeded
reservoir sample over the whole stream (one pass, O(N) memory), or the first N
documents as the paper does. Ids are ``<source>:<content hash>``: stable across
runs, machines and selection modes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import __version__
from .arrow_dataset import write_dataset_dir
from .atomic import write_json
from .build import SourceSpec, doc_digests
from .documents import Document, Reject
from .errors import UserError
from .progress import progress_bar
from .readers import read_documents, resolve_inputs
from .schema import DOCUMENT_SCHEMA
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

REPLAY_MANIFEST = "replay.json"
REPLAY_DATA = "data"


@dataclass(frozen=True)
class ReplayShard:
    """A replay shard on disk: ``replay.json`` (the manifest) and ``data/`` (a saved dataset, one row per sample).

    The one place that knows the layout; ``build_replay`` writes it, the trainer,
    the GeRe cache builder and eval read it through this type.
    """

    directory: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> ReplayShard:
        directory = Path(directory)
        try:
            meta = json.loads((directory / REPLAY_MANIFEST).read_text())
        except FileNotFoundError:
            raise UserError(
                f"{directory}: no {REPLAY_MANIFEST}; build the shard with `python -m data_prep replay` or `prepare`"
            ) from None
        return cls(directory, meta)

    @property
    def replay_len(self) -> int:
        return int(self.meta["replay_len"])

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.meta["tokenizer_fingerprint"])

    def rows(self) -> Any:
        """The samples as a ``datasets.Dataset`` (columns ``id``, ``input_ids``, ...), memory-mapped."""
        import datasets  # the training side's dependency; building a shard needs only pyarrow

        return datasets.load_from_disk(str(self.directory / REPLAY_DATA))


def build_replay(
    spec: SourceSpec,
    tokenizer_path: str,
    out_dir: str | os.PathLike[str],
    num_samples: int = 1000,
    replay_len: int = 512,
    selection: str = "random",
    seed: int = 1234,
    check_against: list[str] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Write the replay shard (see ``ReplayShard``) to ``out_dir``; returns its manifest."""
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    if replay_len < 2:
        raise UserError(f"--replay-len must be >= 2, got {replay_len}")
    if selection not in ("random", "first"):
        raise UserError(f"--selection must be 'random' or 'first', got '{selection}'")
    if spec.role == "instruction":
        raise UserError("the replay shard samples general documents; give a text source, not instruction data")
    tokenizer = load_tokenizer(tokenizer_path)
    chosen, seen_docs, rejected = _sample(spec, num_samples, selection, seed, quiet)
    if not chosen:
        raise UserError(f"source '{spec.name}': no usable documents to sample replay data from")
    if len(chosen) < num_samples:
        log.warning(
            "replay: only %d usable documents in '%s'; the shard has %d samples, not %d",
            seen_docs,
            spec.name,
            len(chosen),
            num_samples,
        )
    ids = tokenizer.encode_batch([d.text for d in chosen])
    samples = [(doc_ids + [tokenizer.eos_id])[:replay_len] for doc_ids in ids]
    table = pa.table(
        {
            "id": [f"{spec.name}:{d.digest:016x}" for d in chosen],
            "input_ids": pa.array(samples, pa.list_(pa.int32())),
            "loss_mask": pa.array([[1] * len(s) for s in samples], pa.list_(pa.uint8())),
        },
        schema=DOCUMENT_SCHEMA,
    )
    written = write_dataset_dir(Path(out_dir) / REPLAY_DATA, DOCUMENT_SCHEMA, [table], 1)
    lengths = np.array([len(s) for s in samples])
    digests = np.array([d.digest for d in chosen], dtype=np.uint64)
    overlap = {"train": 0, "holdout": 0}
    for build_dir in check_against or []:
        overlap["train"] += int(np.isin(digests, doc_digests(build_dir, holdout=False)).sum())
        overlap["holdout"] += int(np.isin(digests, doc_digests(build_dir, holdout=True)).sum())
    if overlap["train"] or overlap["holdout"]:
        log.warning(
            "replay: %d sample(s) also occur in training data and %d in holdout data (listed builds)",
            overlap["train"],
            overlap["holdout"],
        )
    manifest = {
        "version": __version__,
        "source": spec.name,
        "inputs": list(spec.paths),
        "selection": selection,
        "seed": seed,
        "num_samples": len(samples),
        "requested_samples": num_samples,
        "replay_len": replay_len,
        "documents_seen": seen_docs,
        "rejects": rejected,
        "tokens": int(lengths.sum()),
        "mean_len": float(lengths.mean()),
        "truncated": int((lengths == replay_len).sum()),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer_path": str(tokenizer_path),
        "overlap_with": {"builds": [os.path.relpath(b, out_dir) for b in check_against or []], **overlap},
        "shards": written,
    }
    write_json(Path(out_dir) / REPLAY_MANIFEST, manifest)
    log.info(
        "replay: %d samples (mean %.0f tokens, %d truncated to %d) → %s",
        len(samples),
        lengths.mean(),
        manifest["truncated"],
        replay_len,
        out_dir,
    )
    return manifest


def _sample(spec: SourceSpec, n: int, selection: str, seed: int, quiet: bool) -> tuple[list[Document], int, int]:
    """Reservoir-sample (Algorithm R) ``n`` distinct documents; returned in stream order."""
    rng = np.random.default_rng(seed)
    reservoir: list[tuple[int, Document]] = []
    seen: set[int] = set()
    count = rejected = 0
    bar = progress_bar(desc=f"replay {spec.name}", unit="doc", quiet=quiet)
    for item in read_documents(resolve_inputs(spec.paths), spec.read):
        bar.update(1)
        if isinstance(item, Reject):
            rejected += 1
            continue
        if item.digest in seen:
            continue
        seen.add(item.digest)
        if len(reservoir) < n:
            reservoir.append((count, item))
        elif selection == "first":
            break
        else:
            j = int(rng.integers(0, count + 1))
            if j < n:
                reservoir[j] = (count, item)
        count += 1
    bar.close()
    return [d for _, d in sorted(reservoir, key=lambda p: p[0])], count, rejected
