"""GeRe replay shard: N documents, each alone and truncated, stable ids, seeded, overlaps reported."""

from __future__ import annotations

import datasets
import pytest

from data_prep.build import BuildOptions, SourceSpec, build_source
from data_prep.errors import UserError
from data_prep.replay import build_replay
from data_prep.tokenizer import load_tokenizer


def general(sample) -> SourceSpec:
    return SourceSpec(name="gen", role="general", paths=(str(sample.general),))


def test_each_sample_is_one_document_alone_truncated_to_replay_len(sample, tmp_path):
    manifest = build_replay(
        general(sample), str(sample.tokenizer), tmp_path, num_samples=20, replay_len=48, seed=1, quiet=True
    )
    ds = datasets.load_from_disk(str(tmp_path / "data"))
    tok = load_tokenizer(sample.tokenizer)
    full = {f"gen:{d:016x}": ids + [tok.eos_id] for d, ids in zip(_digests(sample), tok.encode_batch(_texts(sample)))}
    assert len(ds) == manifest["num_samples"] == 20
    for row in ds:
        assert row["input_ids"] == full[row["id"]][:48]  # a prefix of exactly one document, nothing packed in
    assert manifest["truncated"] == sum(len(r) == 48 for r in ds["input_ids"])


def test_selection_is_seeded_and_first_mode_takes_the_first_documents(sample, tmp_path):
    a = build_replay(general(sample), str(sample.tokenizer), tmp_path / "a", 10, 32, seed=1, quiet=True)
    b = build_replay(general(sample), str(sample.tokenizer), tmp_path / "b", 10, 32, seed=1, quiet=True)
    c = build_replay(general(sample), str(sample.tokenizer), tmp_path / "c", 10, 32, seed=2, quiet=True)
    build_replay(general(sample), str(sample.tokenizer), tmp_path / "f", 10, 32, selection="first", quiet=True)
    ids = {k: datasets.load_from_disk(str(tmp_path / k / "data"))["id"] for k in "abcf"}
    assert ids["a"] == ids["b"] != ids["c"]
    assert a["shards"] == b["shards"] and c["num_samples"] == 10
    assert ids["f"] == [f"gen:{d:016x}" for d in _digests(sample)][:10]


def test_samples_that_also_occur_in_training_data_are_reported(sample, tmp_path):
    build = build_source(
        general(sample),
        BuildOptions(seq_len=64, docs_per_chunk=32),
        str(sample.tokenizer),
        tmp_path / "cache",
        quiet=True,
    )
    manifest = build_replay(
        general(sample), str(sample.tokenizer), tmp_path / "r", 15, 32, check_against=[str(build)], quiet=True
    )
    assert manifest["overlap_with"]["train"] + manifest["overlap_with"]["holdout"] == 15


def test_asking_for_more_samples_than_documents_takes_all_and_says_so(sample, tmp_path, caplog):
    n = len(set(_texts(sample)))
    manifest = build_replay(general(sample), str(sample.tokenizer), tmp_path, 10_000, 32, quiet=True)
    assert manifest["num_samples"] == n and "only" in caplog.text


def test_instruction_source_is_refused(sample, tmp_path):
    spec = SourceSpec(name="qa", role="instruction", paths=(str(sample.instruction),))
    with pytest.raises(UserError, match="general documents"):
        build_replay(spec, str(sample.tokenizer), tmp_path, quiet=True)


def _texts(sample) -> list[str]:
    seen, out = set(), []
    for t in sample.texts("general"):
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _digests(sample) -> list[int]:
    from data_prep.documents import content_digest

    return [content_digest(t, None) for t in _texts(sample)]
