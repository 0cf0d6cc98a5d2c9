"""The unit that flows through data prep: one document (or instruction example)."""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["domain", "general", "instruction"]
ROLES: tuple[str, ...] = typing.get_args(Role)
PRETRAIN_ROLES = ("domain", "general")


@dataclass(frozen=True)
class Document:
    """A validated document read from ``path`` at ``line`` (1-based; row for columnar files).

    Pretraining documents carry ``text``; instruction examples carry ``messages``
    (prompt/response pairs are normalised to a user + assistant exchange).
    """

    path: str
    line: int
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    digest: int = field(default=0, compare=False)

    @property
    def is_instruction(self) -> bool:
        return self.messages is not None


@dataclass(frozen=True)
class Reject:
    """A record that could not be used, and why; collected into the rejects report."""

    path: str
    line: int | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "line": self.line, "reason": self.reason}


def content_digest(text: str | None, messages: tuple[tuple[str, str], ...] | None) -> int:
    """64-bit content hash for exact-duplicate detection and stable ids.

    64 bits keeps the dedup set small (~60 B per document in a Python set); the
    chance of any collision stays below 1e-3 up to ~2e8 documents.
    """
    payload = text if messages is None else json.dumps(messages, ensure_ascii=False)
    return int.from_bytes(hashlib.blake2b(payload.encode("utf-8"), digest_size=8).digest(), "little")
