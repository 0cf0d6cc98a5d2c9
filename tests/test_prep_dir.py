"""The prep directory's index: complete only when written, readable from any cwd and after a move."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import pytest

from cpt_core.errors import InputError, UserError
from data_prep.prep_dir import PrepDir

from .train_helpers import make_prep


def test_a_prep_built_with_a_relative_out_reads_from_another_cwd_and_after_a_move(sample, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_prep(sample, Path("prep"))
    stored = json.loads((tmp_path / "prep" / "prep.json").read_text())
    assert stored["mixture"] == "mixture" and not Path(stored["builds"]["docs"]).is_absolute()
    moved = tmp_path / "elsewhere" / "prep"
    shutil.move(tmp_path / "prep", moved)
    monkeypatch.chdir("/")
    index = PrepDir(moved).read()
    for path in (index.mixture_rows, index.replay, *index.holdout.values(), *index.builds.values(), index.tokenizer):
        assert path.is_absolute() and path.exists(), path
        assert path == index.tokenizer or path.is_relative_to(moved)
    assert len(datasets.load_from_disk(str(index.mixture_rows))) == index.rows > 0


def test_a_prep_interrupted_after_it_started_is_never_complete(prep, tmp_path):
    copy = PrepDir(tmp_path / "prep")
    shutil.copytree(prep, copy.root)
    assert copy.is_complete()
    copy.invalidate()
    assert not copy.is_complete()
    with pytest.raises(UserError, match="no prep.json"):
        copy.read()


def test_a_damaged_index_names_its_file(tmp_path):
    (tmp_path / "prep.json").write_text(json.dumps({"seq_len": 64}))
    with pytest.raises(InputError, match=f"{tmp_path / 'prep.json'}: not a prep index"):
        PrepDir(tmp_path).read()


def test_a_re_mixed_prep_points_at_the_original_builds_by_absolute_path(prep, tmp_path):
    from data_prep.mix import mix

    index = PrepDir(prep).read()
    seeded = PrepDir(tmp_path / "seeded")
    manifest = mix([str(b) for b in index.builds.values()], seeded.mixture, 0.15, seed=7, batch_rows=4, quiet=True)
    seeded.write(index.with_mixture(seeded.mixture, manifest["achieved_token_share"], manifest["rows"]))
    stored = json.loads(seeded.index_path.read_text())
    assert stored["mixture"] == "mixture" and all(os.path.isabs(p) for p in stored["holdout"].values())
    again = seeded.read()
    assert again.holdout == index.holdout and again.mixture == seeded.mixture.resolve()
