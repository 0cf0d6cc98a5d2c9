"""The run file and `cpt run`: every problem at once, before any heavy work; stages redone only when their
inputs change."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cpt_core.errors import ConfigProblems
from pipeline.run import Runner
from pipeline.runfile import PRESETS, load_run, smoke_settings

from .train_helpers import ROOT


def run_file(sample, path: Path, **changes) -> Path:
    """A small valid run file on the test corpora and a from-scratch model."""
    raw = {
        "run_dir": "out",
        "gpus": 2,
        "data": {
            "tokenizer": str(sample.tokenizer),
            "seq_len": 64,
            "sources": [
                {"name": "code", "role": "domain", "paths": str(sample.domain)},
                {"name": "docs", "role": "general", "paths": [str(sample.general)]},
            ],
            "replay": {"num_samples": 8, "replay_len": 32},
        },
        "model": {"config": {"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 1}},
        "deepspeed": "zero3_cpu",
        "steps": 3,
        "replay": {"strategy": "kl", "weight": 1.5, "ce_weight": 0.0, "samples_per_step": 2},
    }
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_run_file_fills_what_each_stage_reads(sample, tmp_path):
    run = load_run(run_file(sample, tmp_path / "run.yaml"))
    assert run.run_dir == (tmp_path / "out").resolve() and run.gpus == 2
    assert run.train.data.prep == str(run.prep_dir) and run.train.run_dir == str(run.train_dir)
    assert run.train.deepspeed == str(PRESETS["zero3_cpu"]) and not run.uses_cache
    assert run.prep_raw["out"] == str(run.prep_dir) and run.prep_raw["sources"][0]["paths"] == [str(sample.domain)]
    tm = load_run(run_file(sample, tmp_path / "tm.yaml", replay={"strategy": "tm"}))
    assert tm.uses_cache and tm.train.replay.cache == str(tm.run_dir / "gere_cache")


def test_check_reports_every_mistake_at_once_naming_file_and_key_in_seconds(sample, tmp_path):
    bad = run_file(
        sample,
        tmp_path / "bad.yaml",
        gpu=2,  # a typo of gpus
        deepspeed="zero3_gpu",
        model={"path": str(tmp_path / "no-such-model")},
        optim={"lr": "abc"},
        data={"seq_len": 64, "mix": {"general_ratio": 1.5}, "sources": [{"name": "a", "role": "domain", "paths": "x"}]},
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "check", str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert time.perf_counter() - started < 5 and done.returncode == 2
    for expected in (
        "unknown key 'gpu'; did you mean 'gpus'?",
        "deepspeed: zero3_gpu is neither a preset",
        "model.path:",
        "optim.lr must be a number or null, got 'abc'",
        "data: mix.general_ratio must be in [0, 1), got 1.5",
        "data.sources[0].paths: ",
    ):
        assert f"{bad}: {expected}" in done.stderr, (expected, done.stderr)
    assert "6 problem(s)" in done.stderr


def test_multiple_choice_files_are_checked_and_resolved_beside_the_run_file(sample, tmp_path):
    (tmp_path / "mmlu.csv").write_text('"q","a","b","c","d","A"\n')
    run = load_run(run_file(sample, tmp_path / "run.yaml", eval={"mcq": ["mmlu.csv"]}))
    assert run.train.eval.mcq == (str(tmp_path / "mmlu.csv"),)
    with pytest.raises(ConfigProblems, match="eval.mcq: .*missing.csv is not a file"):
        load_run(run_file(sample, tmp_path / "bad.yaml", eval={"mcq": ["missing.csv"]}))


def test_an_override_that_cannot_be_used_blames_the_override_not_the_file(sample, tmp_path):
    with pytest.raises(ConfigProblems) as error:
        load_run(run_file(sample, tmp_path / "run.yaml"), ["optim.lr=abc"])
    assert error.value.problems == ["--set optim.lr must be a number or null, got 'abc'"]


def test_stages_are_redone_only_downstream_of_what_changed(sample, tmp_path):
    path = run_file(sample, tmp_path / "run.yaml")
    before = {s.name: s.fingerprint for s in Runner(load_run(path)).stages()}
    after = {s.name: s.fingerprint for s in Runner(load_run(path, ["optim.lr=3e-4"])).stages()}
    assert before["prep"] == after["prep"] and before["gere"] == after["gere"]
    assert all(before[s] != after[s] for s in ("train", "export", "eval"))
    logging_only = {s.name: s.fingerprint for s in Runner(load_run(path, ["log.every=5"])).stages()}
    assert logging_only == before  # how often a run logs or saves does not change what it trains
    corpus = tmp_path / "domain.jsonl.gz"
    corpus.write_bytes(sample.domain.read_bytes())
    moved = run_file(sample, tmp_path / "moved.yaml")
    raw = yaml.safe_load(moved.read_text())
    raw["data"]["sources"][0]["paths"] = str(corpus)
    moved.write_text(yaml.safe_dump(raw))
    first = {s.name: s.fingerprint for s in Runner(load_run(moved)).stages()}
    os.utime(corpus, ns=(time.time_ns(), time.time_ns() + 10**9))  # the corpus was rewritten
    second = {s.name: s.fingerprint for s in Runner(load_run(moved)).stages()}
    assert all(first[s] != second[s] for s in ("prep", "train", "export", "eval"))


def test_smoke_runs_every_stage_at_toy_size_in_its_own_directory(sample, tmp_path):
    run = load_run(run_file(sample, tmp_path / "run.yaml", steps=5000), smoke=True)
    assert run.run_dir.name == "out-smoke" and run.train.steps == 4
    assert all(s["max_docs"] == 300 for s in run.prep_raw["sources"])
    assert run.train.replay.samples_per_step == run.gpus
    raw = smoke_settings({"data": {"replay": None, "sources": []}, "tokens": 10**9})
    assert raw["data"]["replay"] is None and "tokens" not in raw


def test_check_warns_of_a_stale_op_build_lock_that_would_hang_the_next_start(sample, tmp_path):
    extensions = tmp_path / "torch_extensions"
    lock = extensions / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    fresh = extensions / "py311_cpu" / "fused_adam" / "lock"  # a build running now
    fresh.parent.mkdir(parents=True)
    fresh.touch()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "check", str(run_file(sample, tmp_path / "run.yaml"))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)},
        timeout=60,
    )
    assert done.returncode == 0 and f"{lock} is 60 minutes old" in done.stderr and str(fresh) not in done.stderr


def test_a_merge_section_adds_a_checked_stage_whose_output_eval_scores(sample, tmp_path, monkeypatch):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    plain = load_run(run_file(sample, tmp_path / "plain.yaml"))
    assert not plain.merge.enabled and "merge" not in [s.name for s in Runner(plain).stages() if s.wanted]
    with pytest.raises(ConfigProblems) as refused:
        load_run(run_file(sample, tmp_path / "bad.yaml", merge={"to_budget": 0.05}))
    assert any("merge needs a base" in p for p in refused.value.problems)
    assert any("data.replay.probe_docs" in p for p in refused.value.problems)
    data = yaml.safe_load(run_file(sample, tmp_path / "x.yaml").read_text())["data"]
    data["replay"]["probe_docs"] = 4
    run = load_run(
        run_file(sample, tmp_path / "run.yaml", model={"path": str(base)}, data=data, merge={"to_budget": 0.05}),
        ["data.tokenizer=" + str(sample.tokenizer)],
    )
    runner = Runner(run)
    assert [s.name for s in runner.stages() if s.wanted] == ["prep", "train", "export", "merge", "eval"]
    called: list[list[str]] = []
    monkeypatch.setattr(runner, "_call", lambda command, env=None: called.append(command))
    runner.merge()
    assert called[0][2:] == [
        "pipeline.merge",
        "--base",
        str(base),
        "--tuned",
        str(run.export_dir),
        "--out",
        str(run.merged_dir),
        "--to-budget",
        "0.05",
        "--prep",
        str(run.prep_dir),
    ]


def test_a_run_file_named_by_a_relative_path_resolves_beside_itself_from_any_cwd(sample, tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    run_file(sample, tmp_path / "cfg" / "run.yaml")
    monkeypatch.chdir(tmp_path)
    run = load_run(Path("cfg") / "run.yaml")
    assert run.run_dir == tmp_path / "cfg" / "out" and Path(run.prep_raw["tokenizer"]).is_absolute()
    assert Path(run.train.run_dir).is_absolute() and Path(run.train.data.prep).is_absolute()


def test_eval_settings_do_not_retrain_and_from_takes_earlier_stages_as_done(sample, tmp_path):
    path = run_file(sample, tmp_path / "run.yaml")
    before = {s.name: s.fingerprint for s in Runner(load_run(path)).stages()}
    after = {s.name: s.fingerprint for s in Runner(load_run(path, ["eval.max_docs=3"])).stages()}
    assert before["train"] == after["train"] and before["eval"] != after["eval"]
    runner = Runner(load_run(path), start="eval")
    runner.stages = lambda: [s for s in Runner.stages(runner) if s.name != "eval"]  # nothing to run for real
    runner.execute()
    assert all(runner.record(s)["complete"] for s in ("prep", "train", "export"))  # a plain rerun keeps them


def test_smoke_keeps_probe_documents_for_a_merge_to_budget(sample, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    data = yaml.safe_load(run_file(sample, tmp_path / "x.yaml").read_text())["data"]
    data["replay"]["probe_docs"] = 64
    path = run_file(sample, tmp_path / "run.yaml", model={"path": str(base)}, data=data, merge={"to_budget": 0.05})
    run = load_run(path, smoke=True)
    assert run.prep_raw["replay"]["probe_docs"] == 8


def test_the_launch_scripts_take_the_run_file_itself(sample, tmp_path):
    """What the SLURM and hostfile scripts start, `pipeline.train --config RUN.yaml`, trains the run file's
    training section in RUN_DIR/train, as `cpt run` does; `cpt plan` reads the run file too."""
    from pipeline.config import load_train_config, to_dict
    from pipeline.runfile import training_config

    from .train_helpers import env, launcher_command, metrics

    model = {"config": {"vocab_size": 768, "hidden_size": 32, "num_hidden_layers": 1}}  # the test tokenizer's
    path = run_file(sample, tmp_path / "run.yaml", gpus=1, steps=2, model=model, replay={"strategy": "none"})
    raw = yaml.safe_load(path.read_text())
    corpus = tmp_path / "domain.jsonl.gz"  # a copy, moved away once the prep is built
    corpus.write_bytes(sample.domain.read_bytes())
    raw["data"]["sources"][0]["paths"] = str(corpus)
    path.write_text(yaml.safe_dump(raw))

    def plan() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "pipeline", "plan", "--config", str(path), "--gpus", "1", "--cpu"]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)

    before_prep = plan()  # planned on the lengths the run file asks for, not a guess
    assert "seq_len 64, replay_len 32 (the run file's data section)" in before_prep.stdout, before_prep.stderr[-2000:]
    prepared = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(path), "--only", "prep"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    corpus.rename(tmp_path / "elsewhere.jsonl.gz")  # training reads the prep: the corpora need not be on the nodes
    assert to_dict(training_config(path)) == to_dict(load_train_config(tmp_path / "out" / "train.yaml"))
    overrides = ["data.prep=p", "steps=5", "model.config={hidden_size: 8}"]  # no file: a config from --set alone
    assert to_dict(training_config(None, overrides)) == to_dict(load_train_config(None, overrides))
    assert to_dict(training_config(path, ["optim.lr=1e-3"])).get("optim", {}).get("lr") == 1e-3

    planned = plan()
    assert planned.returncode == 0 and "per_rank_gb=" in planned.stdout, planned.stderr[-2000:]
    trained = subprocess.run(launcher_command(path, ranks=1), capture_output=True, text=True, env=env(), cwd=ROOT)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert set(metrics(tmp_path / "out" / "train")) >= {1, 2}
