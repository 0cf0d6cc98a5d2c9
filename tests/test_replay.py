"""GeRe replay shard: N documents, each alone and truncated, stable ids, seeded, never trained on or held out."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from cpt_core.errors import UserError
from data_prep.build import BuildOptions, SourceSpec, build_source, doc_digests
from data_prep.holdout import doc_digest
from data_prep.prep_dir import PrepDir
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


def test_documents_of_the_given_builds_are_never_sampled(sample, tmp_path):
    texts = _texts(sample)
    half = tmp_path / "half.jsonl"  # a build of every other general document
    half.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[::2]))
    opts = BuildOptions(seq_len=64, docs_per_chunk=32)
    partial = build_source(
        SourceSpec(name="half", role="general", paths=(str(half),)),
        opts,
        str(sample.tokenizer),
        tmp_path / "cache",
        quiet=True,
    )
    built = set(doc_digests(partial).tolist())
    assert built
    manifest = build_replay(
        general(sample), str(sample.tokenizer), tmp_path / "r", 8, 32, disjoint_from=[str(partial)], quiet=True
    )
    sampled = {int(i.split(":")[1], 16) for i in datasets.load_from_disk(str(tmp_path / "r" / "data"))["id"]}
    assert len(sampled) == 8 and not sampled & built
    assert manifest["overlap_with"]["train"] == manifest["overlap_with"]["holdout"] == 0

    whole = build_source(general(sample), opts, str(sample.tokenizer), tmp_path / "cache", quiet=True)
    with pytest.raises(UserError, match="every usable document is in the builds"):
        build_replay(general(sample), str(sample.tokenizer), tmp_path / "w", 15, 32, disjoint_from=[str(whole)])


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


def test_prepare_never_shares_a_document_between_holdout_replay_and_training(prep):
    index = PrepDir(prep).read()
    replay = _ids(prep / "replay" / "data")
    holdout = set().union(*(_ids(p) for p in index.holdout.values()))
    train = {int(d) for b in index.builds.values() for d in doc_digests(b, holdout=False)}
    assert len(replay) == 16 and holdout and train
    assert not replay & holdout and not replay & train and not holdout & train
    manifest = json.loads((prep / "replay" / "replay.json").read_text())
    assert manifest["overlap_with"]["train"] == manifest["overlap_with"]["holdout"] == 0
    general = json.loads((index.builds["docs"] / "build.json").read_text())
    assert general["docs_reserved_for_replay"] == 16
    # the packed rows themselves: no 24-token run of a replay sample occurs in the training mixture
    stream = np.asarray(datasets.load_from_disk(str(prep / "mixture" / "data"))["input_ids"], np.int32).tobytes()
    for doc in datasets.load_from_disk(str(prep / "replay" / "data"))["input_ids"]:
        if len(doc) >= 24:
            assert np.asarray(doc[:24], np.int32).tobytes() not in stream


def test_probe_documents_are_in_no_other_split(sample, tmp_path):
    from .train_helpers import make_prep

    prep = make_prep(sample, tmp_path / "prep", probe_docs=4)
    index = PrepDir(prep).read()
    probe, replay = _ids(index.probe), _ids(index.replay / "data")
    holdout = set().union(*(_ids(p) for p in index.holdout.values()))
    train = {int(d) for b in index.builds.values() for d in doc_digests(b, holdout=False)}
    assert len(probe) == 4 and len(replay) == 16
    assert not probe & replay and not probe & holdout and not probe & train


def test_reserving_replay_documents_leaves_the_holdout_as_it_was(sample, tmp_path):
    from .train_helpers import make_prep

    with_replay = make_prep(sample, tmp_path / "with")
    without = make_prep(sample, tmp_path / "without", replay=False)
    for role in ("general", "domain"):
        assert _ids(with_replay / "holdout" / role) == _ids(without / "holdout" / role)


def test_the_same_text_in_two_sources_fails_prepare_instead_of_replaying_training_data(sample, tmp_path):
    from data_prep.config import parse_config
    from data_prep.prepare import prepare

    cfg = parse_config(
        {
            "tokenizer": str(sample.tokenizer),
            "out": str(tmp_path / "prep"),
            "seq_len": 64,
            "sources": [
                {"name": "code", "role": "domain", "paths": [str(sample.domain), str(sample.general)]},
                {"name": "docs", "role": "general", "paths": [str(sample.general)]},
            ],
            "replay": {"num_samples": 4, "replay_len": 16},
            "holdout": {"fraction": 0.0},
        },
        base=tmp_path,
        origin="test",
    )
    with pytest.raises(UserError, match="dedupe the sources"):
        prepare(cfg, quiet=True)
    assert not (tmp_path / "prep" / "prep.json").exists()


def _ids(saved: Path) -> set[int]:
    return {doc_digest(i) for i in datasets.load_from_disk(str(saved))["id"]}


def test_a_replay_shard_that_eats_the_general_source_says_where_its_documents_went(sample, tmp_path, caplog):
    from data_prep.config import parse_config
    from data_prep.prepare import prepare

    def config(num_samples: int, general_ratio: float):
        return parse_config(
            {
                "tokenizer": str(sample.tokenizer),
                "out": str(tmp_path / f"prep-{num_samples}-{general_ratio}"),
                "seq_len": 64,
                "sources": [
                    {"name": "code", "role": "domain", "paths": [str(sample.domain)], "max_docs": 40},
                    {"name": "docs", "role": "general", "paths": [str(sample.general)], "max_docs": 40},
                ],
                "mix": {"general_ratio": general_ratio, "batch_rows": 4},
                "replay": {"num_samples": num_samples, "replay_len": 32},
                "holdout": {"fraction": 0.05},
            },
            base=tmp_path,
            origin="test",
        )

    with pytest.raises(UserError, match=r"takes (\d+) of its \1 usable documents.*lower replay.num_samples"):
        prepare(config(1000, 0.15), quiet=True)
    assert not (tmp_path / "prep-1000-0.15" / "cache").exists()  # refused before any build
    prepare(config(15, 0.15), quiet=True)  # most, not all: it goes ahead and says so
    assert "takes 15 of its" in caplog.text and "to train on" in caplog.text
