"""The README's main command in its CI-sized form: the whole pipeline end to end on 2 CPU ranks."""

from __future__ import annotations

import json
import subprocess
import sys

from .train_helpers import ROOT, env


def test_quick_demo_runs_every_stage_and_reports_base_vs_tuned(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluation = json.loads((out / "cpt" / "eval.json").read_text())
    # the base model's own view is the cache (TM 0 at step 1 is tested in test_train); the tuned model drifted
    assert evaluation["tuned"]["replay_tm"] > 0.0 and 0 < evaluation["tuned"]["replay_state_flip_rate"] < 0.5
    for role in ("general", "domain"):
        assert evaluation["base"][f"ppl/{role}"] > 1 and evaluation["tuned"][f"ppl/{role}"] > 1
    report = (out / "cpt" / "report.md").read_text()
    assert "general ppl change (forgetting)" in report and "![ppl](ppl.png)" in report
    assert "report:" in result.stdout and (out / "cpt" / "loss.png").is_file()
