"""Write a directory that ``datasets.load_from_disk`` opens, one shard in memory at a time.

``Dataset.save_to_disk`` needs the whole dataset as one Dataset object first;
this writes the same layout (Arrow IPC stream shards + ``state.json`` +
``dataset_info.json`` made by ``datasets`` itself) from a stream of tables,
atomically: the directory appears, complete, only at the end. The fingerprint
is the content hash, so identical data gives byte-identical directories.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from cpt_core.atomic import atomic_path, sha256_file


def write_dataset_dir(
    out_dir: str | os.PathLike[str], schema: pa.Schema, shards: Iterable[pa.Table], num_shards: int
) -> list[dict[str, object]]:
    """Write ``num_shards`` tables as a saved dataset; returns ``[{file, rows, sha256}]``."""
    import datasets  # seconds to import; only the final write of a mixture or split needs it

    features = datasets.Features.from_arrow_schema(schema)
    schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features.to_dict()}})})
    written: list[dict[str, object]] = []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for i, table in enumerate(shards):
            name = f"data-{i:05d}-of-{num_shards:05d}.arrow"
            with pa.OSFile(str(tmp / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
                writer.write_table(table.replace_schema_metadata(schema.metadata), max_chunksize=1000)
            written.append({"file": name, "rows": table.num_rows, "sha256": sha256_file(tmp / name)})
        if len(written) != num_shards:
            raise RuntimeError(f"expected {num_shards} shards, got {len(written)}")
        fingerprint = hashlib.sha256("".join(str(w["sha256"]) for w in written).encode()).hexdigest()[:16]
        datasets.DatasetInfo(features=features).write_to_directory(str(tmp))
        state = {
            "_data_files": [{"filename": w["file"]} for w in written],
            "_fingerprint": fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        (Path(tmp) / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    return written
