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
    evaluation = json.loads((out / "export" / "eval.json").read_text())
    for role in ("general", "domain"):
        assert evaluation["base"][f"ppl/{role}"] > 1 and evaluation["tuned"][f"ppl/{role}"] > 1
    assert evaluation["tuned"]["ppl/domain"] < evaluation["base"]["ppl/domain"]  # it learned the domain
    report = (out / "export" / "report.md").read_text()
    assert "general ppl change (forgetting)" in report and "![ppl](ppl.png)" in report
    assert "**method**: replay kl (weight 1.5)" in report and "token shares: domain 100.0%" in report
    assert "cosine decay" in report  # the default schedule
    assert "report:" in result.stdout and (out / "export" / "loss.png").is_file()
    # the demo is `cpt run` on a run file a user could write: rerun, every stage is current
    again = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(out / "run.yaml")], capture_output=True, text=True, cwd=ROOT
    )
    assert again.returncode == 0 and again.stderr.count("up to date, skipped") == 4, again.stderr
