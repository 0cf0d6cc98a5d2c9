"""replay: the GeRe replay shard — N general documents, each alone, truncated to ``replay_len``.

GeRe replays a fixed set (~1000) of general samples every step and holds the
model's final-layer activations on them. Each sample is one document's first
``replay_len`` tokens (+ EOS if it ends sooner), never packed with another, so
training sees exactly what the cache builder saw. Selection is a seeded
reservoir sample over the whole stream (one pass, O(N) memory), or the first N
documents as the paper does. Ids are ``<source>:<content hash>``: stable across
runs, machines and selection modes.

A replay sample is never a holdout document nor in a training row: forgetting
scored on text the model replays every step would measure memorisation.
``prepare`` chooses the samples first (skipping the source's holdout, by the
same split its build makes), then builds the source without them; the
manifest's ``overlap_with`` counts, checked against every build, are 0.
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

from cpt_core.atomic import write_json
from cpt_core.errors import UserError
from cpt_core.progress import progress_bar

from . import __version__
from .arrow_dataset import write_dataset_dir
from .build import HoldoutSplit, SourceSpec, doc_digests, found_in_builds
from .documents import Document, Reject
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


@dataclass
class ReplaySelection:
    """The documents a replay shard will hold, chosen in one pass over its source."""

    documents: list[Document]  # in stream order
    seen: int  # distinct usable documents the sampler could choose from
    rejected: int

    @property
    def digests(self) -> frozenset[int]:
        return frozenset(d.digest for d in self.documents)

    def set_apart(self, n: int, seed: int, at_random: bool = True) -> tuple[ReplaySelection, list[Document]]:
        """(the rest, ``n`` documents of this selection), both in stream order: drawn at random, or the last
        ``n`` (so a 'first N' shard stays the first N)."""
        if n == 0:
            return self, []
        if n >= len(self.documents):
            raise UserError(f"{n} probe documents leave none of the {len(self.documents)} chosen for replay")
        count = len(self.documents)
        order = np.random.default_rng([seed, 1]).permutation(count) if at_random else np.arange(count)[::-1]
        drawn = set(order[:n].tolist())
        rest = [d for i, d in enumerate(self.documents) if i not in drawn]
        return ReplaySelection(rest, self.seen, self.rejected), [self.documents[i] for i in sorted(drawn)]


def select_replay(
    spec: SourceSpec,
    num_samples: int = 1000,
    selection: str = "random",
    seed: int = 1234,
    holdout: HoldoutSplit | None = None,
    exclude: frozenset[int] | np.ndarray | None = None,
    quiet: bool = False,
) -> ReplaySelection:
    """Choose the replay documents of ``spec``: a seeded reservoir sample, or the first ``num_samples``.

    Documents ``holdout`` holds out (the split the source's build will make) and digests in ``exclude``
    (documents of other builds) are never chosen, so the shard is disjoint from the holdout by construction;
    ``prepare`` then builds the source without the chosen documents, so it is disjoint from training too.
    """
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    if selection not in ("random", "first"):
        raise UserError(f"--selection must be 'random' or 'first', got '{selection}'")
    if spec.role == "instruction":
        raise UserError("the replay shard samples general documents; give a text source, not instruction data")
    excluded = frozenset() if exclude is None else frozenset(int(d) for d in exclude)
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
        duplicate = item.digest in seen
        if duplicate and spec.dedup:
            continue  # the build drops it before its holdout split too
        seen.add(item.digest)
        held = holdout.held(item.digest) if holdout is not None else False  # every document the build splits
        if duplicate or held or item.digest in excluded:
            continue
        if len(reservoir) < num_samples:
            reservoir.append((count, item))
        elif selection == "first":
            break
        else:
            j = int(rng.integers(0, count + 1))
            if j < num_samples:
                reservoir[j] = (count, item)
        count += 1
    bar.close()
    return ReplaySelection([d for _, d in sorted(reservoir, key=lambda p: p[0])], count, rejected)


def overlap_with_builds(digests: frozenset[int], build_dirs: list[str]) -> dict[str, int]:
    """How many of the documents ``digests`` the builds train on, and hold out."""
    return found_in_builds(np.array(sorted(digests), dtype=np.uint64), build_dirs)


def refuse_overlap(spec: SourceSpec, overlap: dict[str, int], builds: list[str]) -> None:
    if overlap["train"] or overlap["holdout"]:
        raise UserError(
            f"replay from '{spec.name}': {overlap['train']} sample(s) also occur in training data and "
            f"{overlap['holdout']} in holdout data of {builds}: the same text is in more than one source; "
            "dedupe the sources"
        )


def write_replay(
    chosen: ReplaySelection,
    spec: SourceSpec,
    tokenizer_path: str,
    out_dir: str | os.PathLike[str],
    num_samples: int,
    replay_len: int,
    selection: str,
    seed: int,
    builds: list[str],
    overlap: dict[str, int],
) -> dict[str, Any]:
    """Write the shard (see ``ReplayShard``) from ``chosen``; refused if ``overlap`` (its documents found in
    ``builds``, from :func:`overlap_with_builds`) is not 0."""
    if replay_len < 2:
        raise UserError(f"--replay-len must be >= 2, got {replay_len}")
    if not chosen.documents:
        raise UserError(f"source '{spec.name}': no usable documents to sample replay data from")
    refuse_overlap(spec, overlap, builds)
    if len(chosen.documents) < num_samples:
        log.warning(
            "replay: only %d documents of '%s' can be sampled (outside its holdout and the builds); %d samples, not %d",
            chosen.seen,
            spec.name,
            len(chosen.documents),
            num_samples,
        )
    tokenizer = load_tokenizer(tokenizer_path)
    ids = tokenizer.encode_batch([d.text for d in chosen.documents])
    samples = [(doc_ids + [tokenizer.eos_id])[:replay_len] for doc_ids in ids]
    written = _write_documents(Path(out_dir) / REPLAY_DATA, spec, chosen.documents, samples)
    lengths = np.array([len(s) for s in samples])
    manifest = {
        "version": __version__,
        "source": spec.name,
        "inputs": list(spec.paths),
        "selection": selection,
        "seed": seed,
        "num_samples": len(samples),
        "requested_samples": num_samples,
        "replay_len": replay_len,
        "documents_seen": chosen.seen,
        "rejects": chosen.rejected,
        "tokens": int(lengths.sum()),
        "mean_len": float(lengths.mean()),
        "truncated": int((lengths == replay_len).sum()),
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "tokenizer_path": str(tokenizer_path),
        "overlap_with": {"builds": [os.path.relpath(b, out_dir) for b in builds], **overlap},
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


def _write_documents(
    out_dir: Path, spec: SourceSpec, documents: list[Document], ids: list[list[int]]
) -> list[dict[str, Any]]:
    """One row per document (``id`` ``<source>:<content hash>``, its token ids, loss on every token), as a saved
    dataset; returns its shard list."""
    table = pa.table(
        {
            "id": [f"{spec.name}:{d.digest:016x}" for d in documents],
            "input_ids": pa.array(ids, pa.list_(pa.int32())),
            "loss_mask": pa.array([[1] * len(x) for x in ids], pa.list_(pa.uint8())),
        },
        schema=DOCUMENT_SCHEMA,
    )
    return write_dataset_dir(out_dir, DOCUMENT_SCHEMA, [table], 1)


def write_probe(documents: list[Document], spec: SourceSpec, tokenizer_path: str, out_dir: Path) -> None:
    """The forgetting budget's probe documents, whole, as holdout rows are (``id``, ``input_ids`` + EOS)."""
    tokenizer = load_tokenizer(tokenizer_path)
    _write_documents(
        out_dir,
        spec,
        documents,
        [doc + [tokenizer.eos_id] for doc in tokenizer.encode_batch([d.text for d in documents])],
    )
    log.info("probe: %d general documents for the forgetting budget → %s", len(documents), out_dir)


def build_replay(
    spec: SourceSpec,
    tokenizer_path: str,
    out_dir: str | os.PathLike[str],
    num_samples: int = 1000,
    replay_len: int = 512,
    selection: str = "random",
    seed: int = 1234,
    disjoint_from: list[str] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """A shard from ``spec`` alone, never sampling a document of the ``disjoint_from`` builds (training or
    holdout); returns its manifest. ``prepare`` instead reserves the documents before building their source."""
    builds = list(disjoint_from or [])
    if not builds:
        log.warning("replay: no builds given to stay disjoint from; the shard may share documents with training")
    if replay_len < 2:
        raise UserError(f"--replay-len must be >= 2, got {replay_len}")
    exclude = np.concatenate([doc_digests(b) for b in builds]) if builds else None
    chosen = select_replay(spec, num_samples, selection, seed, exclude=exclude, quiet=quiet)
    if not chosen.documents and builds:
        raise UserError(
            f"source '{spec.name}': every usable document is in the builds {builds}; sample replay from "
            "another source, or run `prepare`, which keeps replay documents out of the build"
        )
    overlap = overlap_with_builds(chosen.digests, builds)
    return write_replay(
        chosen, spec, tokenizer_path, out_dir, num_samples, replay_len, selection, seed, builds, overlap
    )
