"""mix: exact shares in every global batch, determinism, datasets-loadable output, clear errors."""

from __future__ import annotations

import hashlib
import json

import datasets
import numpy as np
import pytest

from cpt_core.errors import UserError
from data_prep.build import BuildOptions, SourceSpec, build_source
from data_prep.mix import max_batch_deviation, mix, stratified_roles

OPTIONS = BuildOptions(seq_len=96, seed=3, docs_per_chunk=16, max_reject_fraction=0.3)  # long Q&A rejected


@pytest.fixture(scope="module")
def builds(sample, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return [
        str(
            build_source(
                SourceSpec(name=f"src-{r}", role=r, paths=(str(getattr(sample, r)),), holdout_fraction=0.0),
                OPTIONS,
                str(sample.tokenizer),
                cache,
                quiet=True,
            )
        )
        for r in ("domain", "general", "instruction")
    ]


def test_general_share_is_within_one_row_in_every_global_batch(builds, tmp_path):
    manifest = mix(builds[:2], tmp_path, general_ratio=0.15, seed=1, quiet=True)
    roles = np.array(datasets.load_from_disk(str(tmp_path / "data"))["role"])
    assert len(roles) == manifest["rows"] > 200
    for batch in (8, 13, 32, 64, 100):
        counts = np.convolve(roles == "general", np.ones(batch, int), mode="valid")  # every window, every offset
        assert np.all(np.abs(counts - 0.15 * batch) < 1.0), batch
    assert abs(manifest["achieved_token_share"]["general"] - 0.15) <= 1 / manifest["rows"]
    assert manifest["rows_by_role"]["domain"] <= manifest["rows_available_by_role"]["domain"]


def test_instruction_share_holds_per_batch_within_two_rows(builds, tmp_path):
    manifest = mix(builds, tmp_path, general_ratio=0.1, instruction_ratio=0.2, seed=1, quiet=True)
    roles = np.array(datasets.load_from_disk(str(tmp_path / "data"))["role"])
    counts = np.convolve(roles == "instruction", np.ones(32, int), mode="valid")
    assert np.all(np.abs(counts - 0.2 * 32) < 2.0)
    assert manifest["order"]["max_deviation_rows"]["general"] < 1.0


def test_same_seed_gives_identical_bytes_and_another_seed_another_order(builds, tmp_path):
    def digest(path):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((path / "data").iterdir())}

    mix(builds[:2], tmp_path / "a", general_ratio=0.2, seed=5, quiet=True)
    mix(builds[:2], tmp_path / "b", general_ratio=0.2, seed=5, quiet=True)
    mix(builds[:2], tmp_path / "c", general_ratio=0.2, seed=6, quiet=True)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_mixture_rows_are_the_built_rows_each_domain_row_at_most_once(builds, tmp_path):
    manifest = mix(builds[:2], tmp_path, general_ratio=0.15, seed=2, quiet=True)
    ds = datasets.load_from_disk(str(tmp_path / "data"))
    assert ds.features["input_ids"].length == 96
    domain = [tuple(r) for r, role in zip(ds["input_ids"], ds["role"]) if role == "domain"]
    assert len(set(domain)) == len(domain) == manifest["rows_by_role"]["domain"]
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert saved["tokenizer_fingerprint"] and {s["name"] for s in saved["sources"]} == {"src-domain", "src-general"}
    assert all(len(s["sha256"]) == 64 for s in saved["shards"])
    assert all(s["inputs"][0]["sha256"] for s in saved["sources"])


def test_stratified_roles_hit_the_ratio_for_any_length():
    for n in (1, 7, 100, 12345):
        for r in (0.0, 0.1, 0.15, 0.5, 0.99):
            roles = stratified_roles(n, r)
            assert abs((roles == 1).sum() - r * n) <= 0.5 + 1e-9
            assert max_batch_deviation(roles, 1, r, min(n, 10)) < 1.0


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_unit_interval_is_a_clear_error(builds, tmp_path, ratio):
    with pytest.raises(UserError, match="general-ratio must be in"):
        mix(builds[:2], tmp_path, general_ratio=ratio, quiet=True)


def test_builds_with_other_seq_len_are_refused(sample, builds, tmp_path):
    other = build_source(
        SourceSpec(name="other", role="general", paths=(str(sample.general),)),
        BuildOptions(seq_len=64, docs_per_chunk=16),
        str(sample.tokenizer),
        tmp_path,
        quiet=True,
    )
    with pytest.raises(UserError, match="seq_len 64 differs"):
        mix([builds[0], str(other)], tmp_path / "out", general_ratio=0.1, quiet=True)
