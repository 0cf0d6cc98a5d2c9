"""The CLI as a user meets it: clear one-line errors naming the file, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.prep_dir import PrepDir


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def test_help_explains_every_command():
    top = run("--help")
    assert top.returncode == 0
    for command in ("build", "merge", "mix", "replay", "holdout", "stats", "inspect", "prepare", "demo"):
        assert command in top.stdout
        sub = run(command, "--help")
        assert sub.returncode == 0 and "usage:" in sub.stdout


def test_missing_tokenizer_and_bad_seq_len_are_one_line_errors(sample, tmp_path):
    base = ["build", "--name", "x", "--role", "domain", "--input", str(sample.domain), "--cache", str(tmp_path)]
    assert_user_error(run(*base, "--tokenizer", str(tmp_path / "missing.model")), "missing.model: tokenizer not found")
    assert_user_error(run(*base, "--tokenizer", str(sample.tokenizer), "--seq-len", "1"), "seq_len must be > 1")


def test_too_many_rejects_fail_the_build_and_leave_no_completion_marker(sample, tmp_path):
    lines = [{"text": t} for t in sample.texts("general")[:10]] + ["not json"] * 3
    path = tmp_path / "half.jsonl"
    path.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in lines))
    args = [
        "build",
        "--name",
        "half",
        "--role",
        "general",
        "--input",
        str(path),
        "--tokenizer",
        str(sample.tokenizer),
        "--cache",
        str(tmp_path / "cache"),
        "--seq-len",
        "64",
        "-q",
    ]
    result = run(*args)
    assert_user_error(result, "3 of 13 records rejected", "rejects.jsonl", "malformed JSON")
    build_dir = next((tmp_path / "cache" / "general").iterdir())
    assert not (build_dir / "build.json").exists()
    rejects = [json.loads(line) for line in (build_dir / "rejects.jsonl").read_text().splitlines()]
    assert [(r["path"], r["line"]) for r in rejects] == [(str(path), 11), (str(path), 12), (str(path), 13)]
    ok = run(*args, "--max-reject-fraction", "0.5")
    assert ok.returncode == 0 and (build_dir / "build.json").is_file()
    assert "3 of 13 records rejected" in ok.stderr and "rejects.jsonl" in ok.stderr  # said under -q too
    assert Path(ok.stdout.strip()) == build_dir


def test_mix_ratio_out_of_range_is_refused(tmp_path):
    assert_user_error(
        run("mix", str(tmp_path), "--out", str(tmp_path / "m"), "--general-ratio", "1.0"),
        "--general-ratio must be in [0, 1)",
    )


def test_bad_config_names_the_file_and_the_key_or_line(tmp_path):
    cfg = tmp_path / "prep.yaml"
    cfg.write_text("tokenizer: t.model\nout: o\nsources: []\nsed: 3\n")
    assert_user_error(run("prepare", "--config", str(cfg)), "prep.yaml: unknown key 'sed'")
    cfg.write_text("tokenizer: t.model\nout: o\nsources:\n  - name: [unclosed\n")
    assert_user_error(run("prepare", "--config", str(cfg)), "prep.yaml:")
    cfg.write_text("tokenizer: t.model\nout: o\nsources:\n  - {name: a, role: domain, paths: [x], txt_mod: line}\n")
    assert_user_error(run("prepare", "--config", str(cfg)), "unknown key 'sources[0].txt_mod'")
    cfg.write_text(
        "tokenizer: t.model\nout: o\nsources:\n  - {name: a, role: domain, paths: [x]}\nmix: {general_ratio: high}\n"
    )
    assert_user_error(run("prepare", "--config", str(cfg)), "prep.yaml: mix.general_ratio must be a number, got 'high'")
    cfg.write_text("tokenizer: t.model\nout: o\nsources:\n  - {name: a, role: domain, paths: [x], txt_mode: page}\n")
    assert_user_error(run("prepare", "--config", str(cfg)), "prep.yaml: sources[0].txt_mode must be file | line")


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"sources": [{"name": "a", "role": "law", "paths": "x"}]},
            "sources[0].role must be domain | general | instruction",
        ),
        ({"sources": [{"name": "a", "role": "domain", "paths": "x", "dedup": "no"}]}, "sources[0].dedup must be true"),
        ({"tokenizer": 5}, "tokenizer must be a string, got 5"),
        ({"out": None}, "out must not be null"),
        ({"replay": {"num_samples": 0}}, "replay.num_samples must be >= 1, got 0"),
        ({"mix": {"general_ratio": 1.5}}, "mix.general_ratio must be in [0, 1), got 1.5"),
        ({"workers": 0}, "workers must be >= 1, got 0"),
    ],
)
def test_every_prepare_key_is_checked_and_named(change, message):
    from cpt_core.errors import ConfigError
    from data_prep.config import parse_config

    raw = {"tokenizer": "t.model", "out": "o", "sources": [{"name": "a", "role": "domain", "paths": "x"}], **change}
    with pytest.raises(ConfigError) as error:
        parse_config(raw, base=Path("."), origin="prep.yaml")
    assert str(error.value).startswith("prep.yaml: ") and message in str(error.value)


def test_demo_runs_end_to_end_and_stats_and_inspect_read_it(tmp_path):
    demo = run("demo", "--out", str(tmp_path / "demo"), "--small", "-q")
    assert demo.returncode == 0, demo.stderr
    prep = PrepDir(tmp_path / "demo" / "prep").read()
    assert abs(prep.achieved_token_share["general"] - 0.15) < 0.01
    stats = run("stats", str(prep.mixture), "--json")
    assert stats.returncode == 0 and json.loads(stats.stdout)["rows"] == prep.rows
    shown = run("inspect", str(prep.mixture), "--row", "3", "--tokenizer", str(prep.tokenizer))
    assert shown.returncode == 0 and "segment 0" in shown.stdout
    again = run("demo", "--out", str(tmp_path / "demo"), "--small")
    assert again.returncode == 0 and "cached build found" in again.stderr  # a rerun re-tokenizes nothing


def test_the_config_reference_page_is_generated_from_the_declarations():
    from pipeline.config_reference import render

    page = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert page.read_text() == render(), "regenerate: python -m pipeline.config_reference > docs/config.md"
    assert "| `replay.strategy` | none \\| ce \\| kl \\| l1 \\| l2 \\| tm |" in page.read_text()


def test_help_config_prints_every_training_key():
    from dataclasses import fields, is_dataclass

    from pipeline.config import TrainConfig

    shown = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--help-config"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    ).stdout

    def keys(cls, prefix=""):
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            yield from keys(type(default), f"{prefix}{f.name}.") if is_dataclass(default) else [f"{prefix}{f.name}"]

    missing = [k for k in keys(TrainConfig) if f"| `{k}` |" not in shown]
    assert not missing and "| `optim.decay` | cosine \\| linear \\| constant \\| wsd |" in shown


def test_cpt_lists_its_commands_at_once_and_names_the_subcommand_in_usage():
    import time

    started = time.perf_counter()
    listed = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True)
    assert listed.returncode == 0 and "prep" in listed.stdout and "export" in listed.stdout
    assert time.perf_counter() - started < 5
    sub = subprocess.run([sys.executable, "-m", "pipeline", "prep", "--help"], capture_output=True, text=True)
    assert sub.returncode == 0 and sub.stdout.startswith("usage: cpt prep")
    wrong = subprocess.run([sys.executable, "-m", "pipeline", "exprot"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "did you mean export" in wrong.stderr


def test_every_cpt_command_answers_help_within_a_second_or_two():
    import time

    from pipeline.cli import COMMANDS

    for name in COMMANDS:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "pipeline", name, "--help"], capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        assert done.returncode == 0 and done.stdout.startswith(f"usage: cpt {name}"), (name, done.stderr[-500:])
        assert elapsed < 2.5, (name, elapsed)  # no torch, DeepSpeed or transformers import before --help


def test_eval_and_train_refuse_missing_inputs_before_any_process_group(prep, tmp_path):
    from .train_helpers import write_config

    missing = tmp_path / "no-such-model"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "eval", "--model", str(missing), "--prep", str(prep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and f"{missing}: not a Hugging Face model directory" in done.stderr
    assert "init_distributed" not in done.stderr and "Initializing TorchBackend" not in done.stderr
    config = write_config(tmp_path / "cpt.yaml", prep, tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", str(config), "--set", f"deepspeed={tmp_path}/none.json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "none.json is not a file" in done.stderr


def test_an_old_flag_name_still_works_and_says_its_new_name(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "gere", "--model-path", str(tmp_path / "none"), "--prep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "warning: --model-path is deprecated; use --model" in done.stderr
    assert done.returncode == 2 and f"{tmp_path}: no prep.json" in done.stderr  # parsed as --model, then refused


def test_data_prep_flags_are_the_typed_config_declarations():
    """Each shared option of a data_prep command takes its type, choices, default and help from the field the
    YAML reads, so --help, the YAML reference and a run without the flag agree."""
    import dataclasses

    from data_prep.build import BuildOptions
    from data_prep.cli import _parser
    from data_prep.config import HoldoutConfig, MixConfig, ReplayShardConfig
    from data_prep.readers import ReadOptions

    build = ["build", "--name", "x", "--role", "domain", "--input", "a.jsonl", "--tokenizer", "t", "--cache", "c"]
    args = _parser().parse_args(build)
    assert (
        (args.seq_len, args.seed, args.docs_per_chunk)
        == (2048, 1234, 1024)
        == tuple(getattr(BuildOptions(), k) for k in ("seq_len", "seed", "docs_per_chunk"))
    )
    assert (args.holdout_fraction, args.holdout_max_docs) == (HoldoutConfig().fraction, HoldoutConfig().max_docs)
    assert (args.txt_mode, args.dedup) == (ReadOptions().txt_mode, True)
    assert _parser().parse_args([*build, "--no-dedup", "--seq-len", "64"]).dedup is False
    replay = _parser().parse_args(["replay", "--name", "g", "--input", "a", "--tokenizer", "t", "--out", "o"])
    assert (replay.role, replay.num_samples, replay.selection) == ("general", 1000, ReplayShardConfig().selection)
    mix = _parser().parse_args(["mix", "b", "--out", "o"])
    assert mix.general_ratio == MixConfig().general_ratio and mix.batch_rows == MixConfig().batch_rows
    doc = {f.name: f.metadata["doc"] for f in dataclasses.fields(ReplayShardConfig)}["replay_len"]
    shown = run("replay", "--help").stdout
    assert doc in " ".join(shown.split())  # the declaration's sentence, as --help wraps it
    with pytest.raises(SystemExit):
        _parser().parse_args([*build[:-4], "--cache", "c"])  # --tokenizer: required, as the YAML's tokenizer is
