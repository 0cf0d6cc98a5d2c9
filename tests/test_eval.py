"""Eval reports forgetting only on documents the run never trained on."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from cpt_core.errors import UserError
from data_prep.build import SourceSpec
from data_prep.replay import build_replay
from pipeline.eval import compare, holdout_contamination
from pipeline.evaluation.perplexity import perplexity_change, perplexity_of
from pipeline.evaluation.report import markdown_table

TUNED = {"ppl/general": 12.0, "ppl/domain": 8.0}
BASE = {"ppl/general": 10.0, "ppl/domain": 10.0}


def test_a_clean_prep_scores_no_replay_or_training_document_and_reports_forgetting(prep):
    found = holdout_contamination(prep, max_docs=1000)
    assert found["general"]["scored"] > 0 and found["domain"]["scored"] > 0
    assert all(c["in_replay"] == c["in_training"] == 0 for c in found.values())
    result = compare(TUNED, BASE, found)
    assert abs(result["general_ppl_change"] - 0.2) < 1e-12 and "not_reported" not in result


def test_holdout_documents_in_the_replay_shard_are_counted_and_forgetting_is_not_reported(sample, prep, tmp_path):
    dirty = tmp_path / "prep"
    shutil.copytree(prep, dirty, ignore=shutil.ignore_patterns("replay"))
    # a shard sampled without staying disjoint, as preps made before this check were: the whole general source
    spec = SourceSpec(name="docs", role="general", paths=(str(sample.general),))
    build_replay(spec, str(sample.tokenizer), dirty / "replay", num_samples=10_000, replay_len=32, quiet=True)
    # the copy reads its own splits: prep.json stores paths relative to the prep directory

    found = holdout_contamination(dirty, max_docs=1000)
    assert found["general"]["in_replay"] == found["general"]["scored"] > 0  # every general doc was sampled
    assert found["domain"]["in_replay"] == 0
    result = compare(TUNED, BASE, found)
    assert "general_ppl_change" not in result and abs(result["domain_ppl_change"] + 0.2) < 1e-12
    assert "general holdout documents are replay samples" in result["not_reported"]
    assert "ppl changes not reported" in markdown_table(result)


def test_each_ppl_change_has_its_standard_error_over_the_scored_documents(prep):
    """Per-document losses give the same change as the perplexities and the error of the ratio estimator."""
    tokens = torch.tensor([40.0, 200.0, 90.0], dtype=torch.float64)
    base = {role: torch.stack([tokens * 2.3, tokens], 1) for role in ("general", "domain")}
    tuned = {
        "general": torch.stack([tokens * 2.3 + torch.tensor([1.0, 30.0, 4.0], dtype=torch.float64), tokens], 1),
        "domain": torch.stack([tokens * 2.1, tokens], 1),  # every document fell alike: no spread
    }
    documents = {"base": base, "tuned": tuned}
    figures = {name: {f"ppl/{r}": perplexity_of(d) for r, d in docs.items()} for name, docs in documents.items()}
    result = compare(figures["tuned"], figures["base"], holdout_contamination(prep, 1000), documents)
    change, error = perplexity_change(base["general"], tuned["general"])
    assert result["general_ppl_change"] == pytest.approx(change, rel=1e-12) and result["general_ppl_change_se"] == error
    assert error > 0 and result["domain_ppl_change_se"] == pytest.approx(0.0, abs=1e-15)
    assert result["domain_ppl_change"] == pytest.approx(math.exp(-0.2) - 1, rel=1e-12)
    table = markdown_table(result)
    assert f"general ppl change (forgetting): {change:+.1%} ± {error:.1%}" in table and "standard error" in table


def checkpoint_seen_by_rank_1(tmp_path, monkeypatch):
    """A training checkpoint (its markers, no weights) and where rank 0 of launch port 4242 exports it, as rank 1
    of that launch sees them: (checkpoint, export directory)."""
    from pipeline.checkpoint.files import COMPLETE, STATE

    checkpoint = tmp_path / "checkpoints" / "step00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE).write_text("{}")
    (checkpoint / STATE).write_text("{}")
    monkeypatch.setenv("MASTER_PORT", "4242")
    monkeypatch.setenv("RANK", "1")
    target = checkpoint.parent / ".eval-export-step00000004-4242"
    return checkpoint, target


def test_other_ranks_wait_for_rank_0s_export_on_the_file_system_not_in_a_collective(tmp_path, monkeypatch):
    from pipeline.eval import hf_view

    checkpoint, target = checkpoint_seen_by_rank_1(tmp_path, monkeypatch)
    (checkpoint.parent / (target.name + ".failed")).write_text("weights do not match the model")
    with pytest.raises(UserError, match="export on rank 0 failed: weights do not match the model"):
        hf_view(checkpoint)
    (checkpoint.parent / (target.name + ".failed")).unlink()
    target.mkdir()  # rank 0's export, renamed into place whole
    assert hf_view(checkpoint) == (target, target)
    assert hf_view(tmp_path) == (tmp_path, None)  # a Hugging Face directory is read as it is


def test_a_failure_marker_or_export_left_by_an_earlier_launch_is_not_read(tmp_path, monkeypatch):
    import os

    import pipeline.eval as evaluation

    checkpoint, target = checkpoint_seen_by_rank_1(tmp_path, monkeypatch)
    stale = checkpoint.parent / (target.name + ".failed")
    stale.write_text("from yesterday")
    target.mkdir()
    yesterday = evaluation.time.time() - 86400
    for p in (stale, target):
        os.utime(p, (yesterday, yesterday))
    with pytest.raises(UserError, match="rank 0 wrote no export in 0.0001 minutes"):
        evaluation.hf_view(checkpoint, timeout_minutes=0.0001)  # neither old file is taken for this launch's
