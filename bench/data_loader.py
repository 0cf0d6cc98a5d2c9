"""Per-step data overhead vs global batch size: what the training loop waits for before its first forward.

    python -m bench.data_loader [--seq-len 4096] [--compute-ms 50]

A synthetic packed mixture (seq_len-token rows of 8 documents each, memory-mapped
Arrow as training reads it) is read by rank 0 of W simulated ranks, micro_batch ×
grad_accum rows each, for global batches of 64 to 4096 rows. Three ways, timed on
the main thread per step (median of the steps after the first):

    global read    every row of the global batch, to count its loss tokens (the
                   trainer before: ~0.7 ms a 4096-token row on every rank)
    own rows       this rank's rows only, read when the step starts
    prefetched     pipeline.training.data.StepReader: this rank's rows, read on a thread
                   while the previous step computes (a sleep of --compute-ms)

Last line: ``prefetched_ms_at_max_vs_min_batch=<x> global_read_ms_at_max_vs_min_batch=<y>``
(flat is 1.0).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import torch

from bench.harness import Samples, clock, finish, table
from data_prep.arrow_dataset import write_dataset_dir
from data_prep.schema import packed_schema
from pipeline.training.data import GlobalOrder, StepReader, packed_inputs, read_step

MICRO, ACCUM = 2, 4  # rows per rank per step: 8, whatever the number of ranks


def synthetic_mixture(rows: int, seq_len: int, out: Path) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    ids = pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(4, 32000, rows * seq_len, dtype=np.int32)), seq_len)
    mask = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(rows * seq_len, dtype=np.uint8)), seq_len)
    docs = pa.array([[seq_len // 8] * 8] * rows, pa.list_(pa.int32()))
    arrow = pa.table(
        [ids, mask, docs, pa.array(["domain"] * rows), pa.array(["synthetic"] * rows)], schema=packed_schema(seq_len)
    )
    write_dataset_dir(out, packed_schema(seq_len), [arrow], 1)
    return datasets.load_from_disk(str(out))


def time_steps(step_fn, steps: int, compute_s: float) -> float:
    """Median ms the main thread spends in ``step_fn`` per step, with ``compute_s`` of work between steps."""
    waits = []
    for step in range(steps):
        waits.append(clock(lambda: step_fn(step)))  # noqa: B023 - called at once, in this iteration
        time.sleep(compute_s)  # the forwards and backwards, during which a prefetch runs
    return Samples(tuple(waits[1:])).median * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--compute-ms", type=float, default=50.0, help="simulated compute per step")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    worlds = [8, 32, 128, 512]  # global batch = 8 rows × W
    with tempfile.TemporaryDirectory(prefix="bench-data-loader-") as tmp:
        mixture = synthetic_mixture(max(worlds) * MICRO * ACCUM, args.seq_len, Path(tmp) / "mixture")
        rows = []
        for world in worlds:
            order = GlobalOrder(len(mixture), MICRO, ACCUM, world, rank=0)

            def global_read(step: int, order: GlobalOrder = order) -> None:
                batch = packed_inputs(mixture[order.global_rows(step)])
                int((batch["labels"][:, 1:] != -100).sum())

            def own_rows(step: int, order: GlobalOrder = order) -> None:
                read_step(mixture, order, step)

            reader = StepReader(mixture, order, torch.device("cpu"))
            timings = [time_steps(fn, args.steps, args.compute_ms / 1e3) for fn in (global_read, own_rows)]
            timings.append(time_steps(reader.read, args.steps, args.compute_ms / 1e3))
            reader.close()
            rows.append((world, order.global_batch, *timings))
    print(
        f"\nrank 0 of W ranks, {MICRO}×{ACCUM} rows of {args.seq_len} tokens a rank, {args.compute_ms:g} ms compute "
        f"a step, median of {args.steps - 1} steps; ms the step waits for data"
    )
    cells = [(w, batch, f"{g:.2f}", f"{own:.2f}", f"{pre:.3f}") for w, batch, g, own, pre in rows]
    print(table(("ranks", "global batch (rows)", "global read ms", "own rows ms", "prefetched ms"), cells))
    first, last = rows[0], rows[-1]
    figures = {
        "prefetched_ms_at_max_vs_min_batch": last[4] / max(first[4], 1e-3),
        "global_read_ms_at_max_vs_min_batch": last[2] / first[2],
    }
    finish("data_loader", figures, {"rows": rows})


if __name__ == "__main__":
    main()
