"""holdout: gather each role's held-out documents into an eval split.

Builds pick holdout documents by a seeded hash of their content before
packing, so they never enter training rows. Across sources the same text
could still sit in one source's train and another's holdout: that is checked
here and reported (and refused unless allowed), by content hash.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cpt_core.atomic import write_json
from cpt_core.errors import UserError

from . import __version__
from .arrow_dataset import write_dataset_dir
from .build import doc_digests, found_in_builds, holdout_rows, load_build
from .schema import DOCUMENT_SCHEMA

log = logging.getLogger(__name__)


def build_holdout(
    build_dirs: list[str], out_dir: str | os.PathLike[str], allow_overlap: bool = False
) -> dict[str, Any]:
    """Write ``out_dir/<role>/`` (saved datasets) and ``holdout.json``; returns the summary."""
    builds = [load_build(d) for d in build_dirs]
    train = np.concatenate([doc_digests(b["dir"], holdout=False) for b in builds]) if builds else np.zeros(0, np.uint64)
    summary: dict[str, Any] = {"version": __version__, "splits": {}}
    for role in sorted({b["role"] for b in builds}):
        members = [b for b in builds if b["role"] == role]
        tables = [t for b in members for t in holdout_rows(b["dir"])]
        table = pa.concat_tables(tables) if tables else DOCUMENT_SCHEMA.empty_table()
        digests = np.concatenate([doc_digests(b["dir"], holdout=True) for b in members])
        overlap = int(np.isin(digests, train).sum())
        if overlap and not allow_overlap:
            raise UserError(
                f"{role} holdout: {overlap} document(s) also occur in another source's training data; "
                "dedupe the sources or pass --allow-overlap"
            )
        if table.num_rows == 0:
            log.warning("%s holdout is empty: raise holdout_fraction or add data", role)
        write_dataset_dir(Path(out_dir) / role, DOCUMENT_SCHEMA, [table], 1)
        lengths = pc.list_value_length(table.column("input_ids")).to_numpy() if table.num_rows else np.zeros(0)
        summary["splits"][role] = {
            "docs": table.num_rows,
            "tokens": int(lengths.sum()),
            "overlap_with_train": overlap,
            "sources": [b["name"] for b in members],
        }
        log.info(
            "holdout %s: %d documents, %d tokens → %s", role, table.num_rows, int(lengths.sum()), Path(out_dir) / role
        )
    write_json(Path(out_dir) / "holdout.json", summary)
    return summary


def doc_digest(doc_id: str) -> int:
    """The content hash in a document id (``<source>:<16 hex digits>``, as builds and the replay shard write it)."""
    return int(doc_id.rsplit(":", 1)[1], 16)


def contamination(ids: Sequence[str], replay_ids: Sequence[str], builds: Sequence[str]) -> dict[str, int]:
    """How many of the documents ``ids`` are replay samples, and how many are in the builds' training rows.

    A forgetting figure scored on such documents measures memorisation: the model trains on them.
    """
    scored = np.array([doc_digest(i) for i in ids], dtype=np.uint64)
    replay = np.array([doc_digest(i) for i in replay_ids], dtype=np.uint64)
    return {
        "scored": len(scored),
        "in_replay": int(np.isin(scored, replay).sum()),
        "in_training": found_in_builds(scored, list(builds))["train"],
    }
