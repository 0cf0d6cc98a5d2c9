"""build: byte-identical for any worker count or piece split, resumable, cached, deduped, holdout disjoint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cpt_core.errors import UserError
from data_prep.build import BuildOptions, SourceSpec, build_source, doc_digests, finalize, load_build
from data_prep.schema import read_ipc_file

OPTIONS = BuildOptions(seq_len=128, seed=7, docs_per_chunk=6)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every output file, by relative path (spec.json names the tokenizer path, so it is left out)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "spec.json"
    }


def spec(sample, role="domain", **kw) -> SourceSpec:
    return SourceSpec(
        name=f"s-{role}",
        role=role,
        paths=(str(getattr(sample, role)),),
        holdout_fraction=kw.pop("holdout_fraction", 0.1),
        **kw,
    )


def test_output_is_identical_for_1_or_2_workers_and_for_a_2_piece_split(sample, tmp_path):
    one = build_source(spec(sample), OPTIONS, str(sample.tokenizer), tmp_path / "w1", workers=1, quiet=True)
    two = build_source(spec(sample), OPTIONS, str(sample.tokenizer), tmp_path / "w2", workers=2, quiet=True)
    first = build_source(
        spec(sample), OPTIONS, str(sample.tokenizer), tmp_path / "k2", num_shards=2, shard_index=0, quiet=True
    )
    assert not (first / "build.json").exists()  # half the chunks: not presented as complete
    with pytest.raises(UserError, match="not built yet"):
        finalize(first)
    second = build_source(
        spec(sample), OPTIONS, str(sample.tokenizer), tmp_path / "k2", num_shards=2, shard_index=1, quiet=True
    )
    assert second == first and (second / "build.json").is_file()
    assert load_build(one)["chunks"] and len(load_build(one)["chunks"]) > 3
    assert tree_digest(one) == tree_digest(two) == tree_digest(second)


def test_rerun_after_a_kill_rebuilds_only_missing_chunks_and_ends_identical(sample, tmp_path):
    clean = build_source(spec(sample), OPTIONS, str(sample.tokenizer), tmp_path / "clean", quiet=True)
    out = build_source(spec(sample), OPTIONS, str(sample.tokenizer), tmp_path / "killed", quiet=True)
    # What a kill leaves: some chunks done, one half-written under a temporary name, no build.json.
    (out / "build.json").unlink()
    shutil.rmtree(out / "chunks" / "000002")
    shutil.rmtree(out / "chunks" / "000003")
    (out / "chunks" / ".tmp-000003.abc").mkdir()
    (out / "chunks" / ".tmp-000003.abc" / "rows.arrow").write_bytes(b"partial")
    (out / ".tmp-reader.json.abc").write_text('{"records": ')  # killed while writing the reader's stats
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "chunks").iterdir() if p.name.isdigit()}

    again = build_source(spec(sample), OPTIONS, str(sample.tokenizer), tmp_path / "killed", quiet=True)

    assert again == out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "chunks").iterdir() if p.name in kept} == kept
    assert not list(out.rglob(".tmp-*"))
    assert tree_digest(out) == tree_digest(clean)


def test_finished_build_is_reused_and_a_changed_option_gets_a_new_cache(sample, tmp_path):
    first = build_source(spec(sample), OPTIONS, str(sample.tokenizer), tmp_path, quiet=True)
    stamp = (first / "build.json").stat().st_mtime_ns
    assert build_source(spec(sample), OPTIONS, str(sample.tokenizer), tmp_path, quiet=True) == first
    assert (first / "build.json").stat().st_mtime_ns == stamp
    other = build_source(
        spec(sample), BuildOptions(seq_len=96, seed=7, docs_per_chunk=6), str(sample.tokenizer), tmp_path, quiet=True
    )
    assert other != first


def test_exact_duplicates_are_removed_and_counted_unless_turned_off(sample, tmp_path):
    texts = sample.texts("general")[:20]
    records = [{"text": t} for t in texts + texts[:5]]
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    src = SourceSpec(name="dups", role="general", paths=(str(path),), holdout_fraction=0.0)
    deduped = load_build(build_source(src, OPTIONS, str(sample.tokenizer), tmp_path / "a", quiet=True))
    assert deduped["duplicates"] == 5 and deduped["docs_train"] == 20
    kept = SourceSpec(name="dups", role="general", paths=(str(path),), holdout_fraction=0.0, dedup=False)
    everything = load_build(build_source(kept, OPTIONS, str(sample.tokenizer), tmp_path / "b", quiet=True))
    assert everything["duplicates"] == 0 and everything["docs_train"] == 25


def test_holdout_documents_never_enter_training_rows(sample, tmp_path):
    out = build_source(spec(sample, holdout_fraction=0.3), OPTIONS, str(sample.tokenizer), tmp_path, quiet=True)
    summary = load_build(out)
    held, train = doc_digests(out, holdout=True), doc_digests(out, holdout=False)
    assert len(held) == summary["docs_holdout"] > 0 and not np.isin(held, train).any()
    rows = pa.concat_tables([read_ipc_file(str(p / "rows.arrow")) for p in sorted((out / "chunks").iterdir())])
    holdout = pa.concat_tables([read_ipc_file(str(p / "holdout.arrow")) for p in sorted((out / "chunks").iterdir())])
    packed = rows.column("input_ids").combine_chunks().flatten().to_numpy()
    stream = packed.tobytes()
    for doc in holdout.column("input_ids").to_pylist():
        probe = np.asarray(doc[:40], dtype=np.int32).tobytes()  # a 40-token run: unique to its document
        assert probe not in stream


def test_prepare_split_into_pieces_then_finished_unsplit_equals_a_single_run(sample, tmp_path):
    from data_prep.config import parse_config
    from data_prep.prepare import prepare

    def config(out):
        return parse_config(
            {
                "tokenizer": str(sample.tokenizer),
                "out": str(out),
                "seq_len": 64,
                "docs_per_chunk": 8,
                "sources": [
                    {"name": "d", "role": "domain", "paths": [str(sample.domain)]},
                    {"name": "g", "role": "general", "paths": [str(sample.general)]},
                ],
                "replay": {"num_samples": 5, "replay_len": 16},
            },
            base=tmp_path,
            origin="test",
        )

    prepare(config(tmp_path / "single"), quiet=True)
    assert prepare(config(tmp_path / "split"), quiet=True, num_shards=3, shard_index=0) is None
    assert not (tmp_path / "split" / "mixture").exists()
    for i in (1, 2):
        prepare(config(tmp_path / "split"), quiet=True, num_shards=3, shard_index=i)
    prepare(config(tmp_path / "split"), quiet=True)
    for part in ("mixture", "replay", "holdout"):
        assert tree_digest(tmp_path / "single" / part) == tree_digest(tmp_path / "split" / part), part


@pytest.mark.reliability("faults: data prep kills")
def test_a_build_killed_mid_run_and_rerun_ends_identical_to_a_clean_one(sample, tmp_path, lost):
    import os
    import signal
    import subprocess
    import sys
    import time

    opts = BuildOptions(seq_len=64, seed=7, docs_per_chunk=2)
    clean = build_source(spec(sample), opts, str(sample.tokenizer), tmp_path / "clean", workers=0, quiet=True)
    args = [
        sys.executable,
        "-m",
        "data_prep",
        "build",
        "--name",
        "s-domain",
        "--role",
        "domain",
        "--input",
        str(sample.domain),
        "--tokenizer",
        str(sample.tokenizer),
        "--cache",
        str(tmp_path / "killed"),
        "--seq-len",
        "64",
        "--seed",
        "7",
        "--docs-per-chunk",
        "2",
        "--holdout-fraction",
        "0.1",
        "-q",
    ]
    proc = subprocess.Popen(args, start_new_session=True)
    chunks = tmp_path / "killed" / "domain" / clean.name / "chunks"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (chunks.is_dir() and len(list(chunks.iterdir())) >= 3):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the reader and its worker, mid-run
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (chunks.parent / "build.json").exists()  # really mid-run
    rerun = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert lost(len(set(tree_digest(chunks.parent).items()) ^ set(tree_digest(clean).items()))) == 0


def test_max_docs_reads_only_the_first_records_of_a_source(sample, tmp_path):
    from data_prep.readers import ReadOptions

    limited = load_build(
        build_source(spec(sample, read=ReadOptions(max_docs=20)), OPTIONS, str(sample.tokenizer), tmp_path)
    )
    assert limited["docs_train"] + limited["docs_holdout"] + limited["duplicates"] + limited["rejects"] == 20
