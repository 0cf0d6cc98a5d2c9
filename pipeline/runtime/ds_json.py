"""Read the user's DeepSpeed JSON and refuse, in seconds and without DeepSpeed, what would fail on the nodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cpt_core.errors import UserError

WRITER_EXAMPLE = '{"type": "python", "decoupled": true}'


def read_ds_json(path: str | Path) -> dict[str, Any]:
    """The DeepSpeed JSON at ``path``, checked (:func:`checkpoint_writer`), its writer section filled in; every
    reader of the file goes through here, so each refuses the same problems with the same words."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"deepspeed: {path} is not a file (ds_configs/ has zero3_bf16.json, ...)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(ds, dict):
        raise UserError(f"{path}: a DeepSpeed config is a JSON object")
    writer = checkpoint_writer(ds, path)
    if writer is not None:
        ds["checkpoint"]["writer"] = writer
    return ds


def checkpoint_writer(ds: dict[str, Any], path: str | Path) -> dict[str, Any] | None:
    """The JSON's ``checkpoint.writer`` (DeepSpeed's asynchronous saves) as ZeRO-3 needs it, or a refusal.

    Every rank holds a partition and must write it, so the writers' ``data_parallel`` unit is ``replica``
    (filled in when absent: DeepSpeed fails without one; ``socket`` or ``machine`` leave some ranks without a
    writer and their partitions unsaved). The ``fast`` type (FastPersist, DeepSpeed's default) runs on the
    async_io op, which would be compiled on every node at start unless DeepSpeed was installed with it built.
    """
    checkpoint = ds.get("checkpoint", {})
    if not isinstance(checkpoint, dict):
        raise UserError(f'{path}: checkpoint must be an object, e.g. {{"writer": {WRITER_EXAMPLE}}}')
    writer = checkpoint.get("writer")
    if writer is None:
        return None
    if not isinstance(writer, dict):
        raise UserError(f"{path}: checkpoint.writer must be an object, e.g. {WRITER_EXAMPLE}")
    zero = ds.get("zero_optimization", {})
    offloaded = [
        k for k in ("offload_optimizer", "offload_param") if (zero.get(k) or {}).get("device", "none") != "none"
    ]
    if writer.get("decoupled") and offloaded:
        raise UserError(
            f"{path}: checkpoint.writer.decoupled with zero_optimization.{offloaded[0]}: handing the offloaded "
            "states (pinned host memory) to the writer processes would move them to unpinned shared memory; "
            "drop the writer section (saves are then synchronous)"
        )
    writer = {**writer, "data_parallel": writer.get("data_parallel", "replica")}
    if str(writer["data_parallel"]).lower() != "replica":
        raise UserError(
            f"{path}: checkpoint.writer.data_parallel is {writer['data_parallel']!r}; under ZeRO-3 every rank "
            "writes its own partition, so it must be 'replica'"
        )
    kind = str(writer.get("type", "fast")).lower()
    if kind not in ("python", "fast"):
        raise UserError(f"{path}: checkpoint.writer.type is {kind!r}; 'python' or 'fast' ('mock' writes nothing)")
    if kind == "fast" and not _async_io_built():
        raise UserError(
            f"{path}: checkpoint.writer.type 'fast' (the default) needs DeepSpeed's async_io op, which this "
            'install has not built, so every node would compile it at start: set "type": "python", or '
            "install DeepSpeed with DS_BUILD_AIO=1"
        )
    return writer


def decoupled_writer(ds: dict[str, Any]) -> bool:
    """Whether the config (as :func:`read_ds_json` returns it) has DeepSpeed save through writer processes."""
    return bool(((ds.get("checkpoint") or {}).get("writer") or {}).get("decoupled"))


def _async_io_built() -> bool:
    from deepspeed.git_version_info import installed_ops  # deepspeed: only when a fast writer is asked for

    return bool(installed_ops.get("async_io"))
