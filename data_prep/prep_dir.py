"""The prep directory: the one owner of its layout and of ``prep.json``, the index training reads.

Layout under the directory:
    cache/<role>/<name>-<key>/   per-source packed chunks (reused across runs and ratios)
    mixture/data + manifest.json training rows in training order
    replay/data + replay.json    GeRe replay shard
    probe/                       documents for the forgetting budget (replay.probe_docs > 0)
    holdout/<role>/ + holdout.json
    prep.json                    where everything is; written last, so its presence means complete

Paths inside the directory are stored relative to it, so a prep works from any
working directory and after the directory is moved; paths outside it (another
prep's builds, a tokenizer) are stored absolute.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cpt_core.atomic import write_json
from cpt_core.errors import InputError, UserError

from . import __version__


@dataclass(frozen=True)
class PrepIndex:
    """What ``prep.json`` says, with every path absolute."""

    mixture: Path  # the mixture directory (its Arrow rows are under ``mixture / "data"``)
    replay: Path | None
    holdout: dict[str, Path]  # role → eval split
    tokenizer: Path
    seq_len: int
    builds: dict[str, Path]  # source name → its build directory (what the mixture was packed from)
    probe: Path | None  # general documents for the forgetting budget, in no other split
    achieved_token_share: dict[str, float]
    rows: int

    @property
    def mixture_rows(self) -> Path:
        return self.mixture / "data"

    def with_mixture(self, mixture: Path, achieved_token_share: dict[str, float], rows: int) -> PrepIndex:
        return replace(self, mixture=Path(mixture).resolve(), achieved_token_share=achieved_token_share, rows=rows)


class PrepDir:
    """Names every path of a prep directory and reads and writes its index."""

    INDEX = "prep.json"

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def index_path(self) -> Path:
        return self.root / self.INDEX

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def mixture(self) -> Path:
        return self.root / "mixture"

    @property
    def replay(self) -> Path:
        return self.root / "replay"

    @property
    def probe(self) -> Path:
        return self.root / "probe"

    @property
    def holdout(self) -> Path:
        return self.root / "holdout"

    def output_dirs(self) -> tuple[Path, ...]:
        """Directories a writer may have left temporaries in."""
        return (self.root, self.mixture, self.holdout, self.replay, self.probe)

    def is_complete(self) -> bool:
        return self.index_path.is_file()

    def invalidate(self) -> None:
        """Remove the index first, so a prep interrupted from here on never reads as complete."""
        self.index_path.unlink(missing_ok=True)

    def write(self, index: PrepIndex) -> None:
        """Write ``prep.json`` atomically; the last step of a prep."""
        write_json(
            self.index_path,
            {
                "version": __version__,
                "tokenizer": str(Path(index.tokenizer).resolve()),
                "seq_len": index.seq_len,
                "mixture": self._store(index.mixture),
                "replay": self._store(index.replay) if index.replay else None,
                "holdout": {role: self._store(p) for role, p in index.holdout.items()},
                "probe": self._store(index.probe) if index.probe else None,
                "builds": {name: self._store(p) for name, p in index.builds.items()},
                "achieved_token_share": index.achieved_token_share,
                "rows": index.rows,
            },
        )

    def read(self) -> PrepIndex:
        if not self.index_path.is_file():
            raise UserError(f"{self.root}: no {self.INDEX}; run `cpt prep` (python -m data_prep prepare) first")
        try:
            meta: dict[str, Any] = json.loads(self.index_path.read_text())
            return PrepIndex(
                mixture=self._load(meta["mixture"]),
                replay=self._load(meta["replay"]) if meta.get("replay") else None,
                holdout={role: self._load(p) for role, p in meta.get("holdout", {}).items()},
                tokenizer=self._load(meta["tokenizer"]),
                seq_len=int(meta["seq_len"]),
                builds={name: self._load(p) for name, p in meta.get("builds", {}).items()},
                probe=self._load(meta["probe"]) if meta.get("probe") else None,
                achieved_token_share=meta.get("achieved_token_share", {}),
                rows=int(meta.get("rows", 0)),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(
                str(self.index_path), f"not a prep index ({type(e).__name__}: {e}); rerun the prep"
            ) from None

    def _store(self, path: str | os.PathLike[str]) -> str:
        path, root = Path(path).resolve(), self.root.resolve()
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    def _load(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else (self.root / path).resolve()
