"""Eval reports forgetting only on documents the run never trained on."""

from __future__ import annotations

import json
import shutil

from data_prep.build import SourceSpec
from data_prep.replay import build_replay
from pipeline.eval import compare, holdout_contamination, markdown_table

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
    meta = json.loads((dirty / "prep.json").read_text())
    (dirty / "prep.json").write_text(json.dumps({**meta, "replay": str(dirty / "replay")}))

    found = holdout_contamination(dirty, max_docs=1000)
    assert found["general"]["in_replay"] == found["general"]["scored"] > 0  # every general doc was sampled
    assert found["domain"]["in_replay"] == 0
    result = compare(TUNED, BASE, found)
    assert "general_ppl_change" not in result and abs(result["domain_ppl_change"] + 0.2) < 1e-12
    assert "general holdout documents are replay samples" in result["not_reported"]
    assert "ppl changes not reported" in markdown_table(result)
