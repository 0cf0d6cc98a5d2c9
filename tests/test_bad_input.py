"""Bad input, one kind per case, through the CLIs a user runs.

Each case ends one of two ways: the build succeeds and the bad records are
counted rejects naming file and line (every good document still arrives), or
the command exits 2 with one line naming the file, key or line (no traceback,
nothing written, earlier outputs byte-identical). Every case is a row of
bench/reliability.py's table; ``lost`` counts good documents or earlier files
that did not survive.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from .train_helpers import ROOT, TINY_LLAMA, digest, env, write_config


@dataclass(frozen=True)
class Rejected:
    """The build succeeds; ``count`` records are rejects whose reasons hold every one of ``reasons``."""

    count: int
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Refused:
    """Exit 2 with one line holding every one of ``needles``."""

    needles: tuple[str, ...]


Case = Callable[[Path, list[str]], tuple[list[str], int, object]]  # (args, good documents, expected outcome)


def jsonl(path: Path, *records: object) -> Path:
    """Records as lines: dicts as JSON, bytes as they are."""
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records))
    return path


def good_records(good: list[str]) -> list[dict[str, str]]:
    return [{"text": t} for t in good]


def build(*inputs: Path, role: str = "domain") -> list[str]:
    return ["build", "--name", "case", "--role", role, "--input", *map(str, inputs)]


# --- data: counted rejects ------------------------------------------------------------------------------


def malformed_json(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", *good_records(good[:4]), b'{"text": "no closing brace"', *good_records(good[4:]))
    return build(path), len(good), Rejected(1, ("malformed JSON", f"{path}:5"))


def truncated_json(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", *good_records(good))
    with open(path, "ab") as f:
        f.write(b'{"text": "the file was cut off in the mid')  # the last line, no newline
    return build(path), len(good), Rejected(1, ("malformed JSON", f"{path}:{len(good) + 1}"))


def invalid_utf8(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", *good_records(good), b'{"text": "caf\xe9 in latin-1"}')
    return build(path), len(good), Rejected(1, ("invalid UTF-8",))


def nul_bytes(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", {"text": "before \u0000 after"}, *good_records(good))
    return build(path), len(good), Rejected(1, ("NUL", f"{path}:1"))


def empty_documents(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", *good_records(good), {"text": ""}, {"text": ""})
    return build(path), len(good), Rejected(2, ("is empty",))


def huge_document(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", {"text": "x" * (50 << 20)}, *good_records(good))  # 50 MB, one line
    return build(path), len(good), Rejected(1, ("too long", f"{path}:1"))


def wrong_field_names(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", *good_records(good), {"body": "text under another name"})
    return build(path), len(good), Rejected(1, ("missing field 'text'", "body"))


def text_not_a_string(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", *good_records(good), {"text": 42}, {"text": ["a", "list"]})
    return build(path), len(good), Rejected(2, ("not a string",))


def not_an_object(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", *good_records(good), [1, 2, 3])
    return build(path), len(good), Rejected(1, ("JSON object",))


def mixed_parquet_schemas(d: Path, good: list[str]):
    (d / "pq").mkdir()
    pq.write_table(pa.table({"text": good}), d / "pq" / "a.parquet")
    pq.write_table(pa.table({"text": [7, 8]}), d / "pq" / "b.parquet")  # another type
    pq.write_table(pa.table({"content": ["another column"]}), d / "pq" / "c.parquet")  # another column
    return build(d / "pq"), len(good), Rejected(3, ("not a string", "missing field 'text'"))


def truncated_gzip(d: Path, good: list[str]):
    data = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in good).encode())
    cut = data[: len(data) * 2 // 3]
    readable = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut)
    (d / "a.jsonl.gz").write_bytes(cut)
    return build(d / "a.jsonl.gz"), readable.count(b"\n"), Rejected(1, ("truncated",))


def binary_file(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", *good_records(good))
    (d / "blob.txt").write_bytes(b"\x7fELF\x00\x01\x02" * 500)
    return build(path, d / "blob.txt"), len(good), Rejected(1, ("binary",))


def instruction_without_answer(d: Path, good: list[str]):
    answered = [{"prompt": "Name a word.", "response": t.split()[0]} for t in good]
    path = jsonl(d / "sft.jsonl", *answered, {"messages": [{"role": "user", "content": "no reply follows"}]})
    args = build(path, role="instruction") + ["--seq-len", "128"]  # room for the chat template around each pair
    return args, len(good), Rejected(1, ("no assistant",))


# --- data: refused --------------------------------------------------------------------------------------


def corrupt_parquet(d: Path, good: list[str]):
    pq.write_table(pa.table({"text": good}), d / "a.parquet")
    data = (d / "a.parquet").read_bytes()
    (d / "a.parquet").write_bytes(data[: len(data) // 2])
    return build(d / "a.parquet"), 0, Refused((f"{d / 'a.parquet'}: cannot open as Parquet",))


def missing_input(d: Path, good: list[str]):
    return build(d / "nope.jsonl"), 0, Refused(("nope.jsonl: no such file",))


def empty_input(d: Path, good: list[str]):
    (d / "a.jsonl").write_bytes(b"")
    return build(d / "a.jsonl"), 0, Refused(("hold no records",))


def too_many_rejects(d: Path, good: list[str]):
    path = jsonl(d / "a.jsonl", *good_records(good[:2]), *[b"not json"] * 3)
    return build(path) + ["--max-reject-fraction", "0.1"], 0, Refused(("3 of 5 records rejected", "rejects.jsonl"))


# --- config ---------------------------------------------------------------------------------------------


def prep_yaml(d: Path, text: str) -> list[str]:
    (d / "prep.yaml").write_text(text)
    return ["prepare", "--config", str(d / "prep.yaml")]


def prepare_bad_yaml(d: Path, good: list[str]):
    args = prep_yaml(d, "tokenizer: t.model\nout: o\nsources:\n  - name: [unclosed\n")
    return args, 0, Refused(("prep.yaml:5", "invalid YAML"))


def prepare_unknown_key(d: Path, good: list[str]):
    args = prep_yaml(d, "tokenizer: t.model\nout: o\nsources: []\nsed: 3\n")
    return args, 0, Refused(("prep.yaml: unknown key 'sed'",))


def prepare_wrong_type(d: Path, good: list[str]):
    args = prep_yaml(
        d, "tokenizer: t.model\nout: o\nsources:\n  - {name: a, role: domain, paths: [x]}\nmix: {general_ratio: high}\n"
    )
    return args, 0, Refused(("prep.yaml: mix.general_ratio must be a number, got 'high'",))


def ratio_out_of_range(d: Path, good: list[str]):
    return ["mix", str(d), "--out", str(d / "m"), "--general-ratio", "1.5"], 0, Refused(("--general-ratio must be",))


def seq_len_too_small(d: Path, good: list[str]):
    return build(jsonl(d / "a.jsonl", *good_records(good))) + ["--seq-len", "1"], 0, Refused(("seq_len must be > 1",))


def missing_tokenizer(d: Path, good: list[str]):
    args = build(jsonl(d / "a.jsonl", *good_records(good))) + ["--tokenizer", str(d / "gone.model")]
    return args, 0, Refused(("gone.model: tokenizer not found",))


def corrupt_tokenizer(d: Path, good: list[str]):
    (d / "bad.model").write_bytes(b"\x0a\x03not a sentencepiece model")
    args = build(jsonl(d / "a.jsonl", *good_records(good))) + ["--tokenizer", str(d / "bad.model")]
    return args, 0, Refused(("bad.model: cannot load SentencePiece model",))


# --- security -------------------------------------------------------------------------------------------


def pickle_as_data(d: Path, good: list[str]):
    (d / "data.pkl").write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00.")
    return build(d / "data.pkl"), 0, Refused(("data.pkl: unknown file type",))


def name_with_a_path(d: Path, good: list[str]):
    args = build(jsonl(d / "a.jsonl", *good_records(good)))
    args[args.index("case")] = "../../outside"
    return args, 0, Refused(("source name '../../outside'",))


DATA_CASES: dict[str, tuple[str, Case]] = {
    **{
        f.__name__: ("bad input: data", f)
        for f in (
            malformed_json,
            truncated_json,
            invalid_utf8,
            nul_bytes,
            empty_documents,
            huge_document,
            wrong_field_names,
            text_not_a_string,
            not_an_object,
            mixed_parquet_schemas,
            truncated_gzip,
            binary_file,
            instruction_without_answer,
            corrupt_parquet,
            missing_input,
            empty_input,
            too_many_rejects,
        )
    },
    **{
        f.__name__: ("bad input: config", f)
        for f in (
            prepare_bad_yaml,
            prepare_unknown_key,
            prepare_wrong_type,
            ratio_out_of_range,
            seq_len_too_small,
            missing_tokenizer,
            corrupt_tokenizer,
        )
    },
    **{f.__name__: ("security", f) for f in (pickle_as_data, name_with_a_path)},
}


@pytest.fixture(scope="module")
def earlier_build(sample, tmp_path_factory) -> Path:
    """A cache holding one complete build, which no failing command may touch."""
    cache = tmp_path_factory.mktemp("earlier") / "cache"
    result = data_prep(
        "build",
        "--name",
        "docs",
        "--role",
        "general",
        "--input",
        str(sample.general),
        "--cache",
        str(cache),
        "--tokenizer",
        str(sample.tokenizer),
        "--seq-len",
        "32",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    return cache


def data_prep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300
    )


def one_line_error(result: subprocess.CompletedProcess[str], needles: tuple[str, ...]) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def cases(table: dict[str, tuple]) -> list:
    return [pytest.param(name, marks=pytest.mark.reliability(table[name][0]), id=name) for name in sorted(table)]


@pytest.mark.parametrize("name", cases(DATA_CASES))
def test_bad_data_or_prep_config(name, sample, earlier_build, tmp_path, lost):
    _, case = DATA_CASES[name]
    good = sample.texts("general")[:12]
    cache = tmp_path / "cache"
    shutil.copytree(earlier_build, cache)
    before = digest(cache)
    args, expected_docs, expected = case(tmp_path, good)
    if args[0] == "build":
        defaults = {
            "--cache": str(cache),
            "--seq-len": "32",
            "--workers": "0",
            "--tokenizer": str(sample.tokenizer),
            "--max-reject-fraction": "0.5" if isinstance(expected, Rejected) else None,
        }
        args += ["-q"] + [a for k, v in defaults.items() if v is not None and k not in args for a in (k, v)]
    result = data_prep(*args)
    if isinstance(expected, Rejected):
        assert result.returncode == 0, result.stderr[-3000:]
        build_dir = Path(result.stdout.strip())
        summary = json.loads((build_dir / "build.json").read_text())
        kept = summary["docs_train"] + summary["docs_holdout"] + summary["duplicates"]
        earlier = {k: v for k, v in digest(cache).items() if k in before}
        assert lost(max(expected_docs - kept, 0) + len(set(before.items()) - set(earlier.items()))) == 0
        rejects = [json.loads(line) for line in (build_dir / "rejects.jsonl").read_text().splitlines()]
        assert summary["rejects"] == len(rejects) == expected.count, rejects
        text = " ".join(f"{r['path']}:{r['line']} {r['reason']}" for r in rejects)
        assert all(reason in text for reason in expected.reasons), (expected.reasons, text)
        assert all(r["path"] for r in rejects)
    else:
        after = digest(cache)
        half_done = [k for k in after if k.endswith("build.json") and k not in before]
        assert lost(len(set(before.items()) - set(after.items())) + len(half_done)) == 0
        one_line_error(result, expected.needles)
        assert not (tmp_path / "outside").exists() and not (tmp_path.parent / "outside").exists()


# --- training config and model ----------------------------------------------------------------------------


def train_cli(config: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env(),
        timeout=600,
    )


def remote_code_model(d: Path) -> Path:
    """A model directory whose config asks for its own Python code, which would leave a marker if it ran."""
    model = d / "custom_model"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "custom",
                "architectures": ["CustomModel"],
                "auto_map": {"AutoConfig": "modeling.CustomConfig", "AutoModelForCausalLM": "modeling.CustomModel"},
            }
        )
    )
    (model / "modeling.py").write_text(f"open({str(d / 'code_ran')!r}, 'w').close()\n")
    (model / "model.safetensors").write_bytes(b"")
    return model


def pickled_weights_model(d: Path) -> Path:
    """A model directory with pickled weights only (pytorch_model.bin), as older checkpoints ship."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = d / "bin_model"
    config = LlamaConfig(**TINY_LLAMA)
    config.save_pretrained(str(model))
    torch.save(LlamaForCausalLM(config).state_dict(), model / "pytorch_model.bin")
    return model


def other_models_cache(d: Path, prep: Path) -> Path:
    from pipeline.gere.build import build_gere_cache
    from pipeline.runtime.model import ModelSource

    return build_gere_cache(
        ModelSource(config=TINY_LLAMA, seed=1), prep / "replay", d / "cache", batch_size=4
    )  # run: seed 0


def ds_json(d: Path, text: str | None = None, **sections: object) -> str:
    """A DeepSpeed JSON in ``d``: the CPU config with ``sections`` set, or ``text`` as it is."""
    ds = json.loads((ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    path = d / "ds.json"
    path.write_text(text if text is not None else json.dumps({**ds, **sections}))
    return str(path)


TRAIN_CASES: dict[str, tuple[str, Callable[[Path, Path], tuple[dict, list[str]]], tuple[str, ...]]] = {
    "deepspeed_json_unparsable": (
        "bad input: config",
        lambda d, p: ({"deepspeed": ds_json(d, '{"zero_optimization": {"stage": 3},\n}')}, []),
        ("ds.json: not valid JSON (line 2",),
    ),
    "async_writer_leaving_ranks_unsaved": (
        "bad input: config",
        lambda d, p: (
            {"deepspeed": ds_json(d, checkpoint={"writer": {"decoupled": True, "data_parallel": "machine"}})},
            [],
        ),
        ("checkpoint.writer.data_parallel", "'replica'"),
    ),
    "train_unknown_key": (
        "bad input: config",
        lambda d, p: ({"optim": {"lr_peak": 1e-4}}, []),
        ("unknown key", "optim.lr_peak"),
    ),
    "train_negative_lr": ("bad input: config", lambda d, p: ({}, ["optim.lr=-1e-5"]), ("optim.lr", "> 0")),
    "train_wrong_type": ("bad input: config", lambda d, p: ({"steps": "many"}, []), ("steps",)),
    "train_missing_prep": (
        "bad input: config",
        lambda d, p: ({"data": {"prep": str(d / "no_prep")}}, []),
        ("no_prep",),
    ),
    "seq_len_above_model_max": (
        "bad input: config",
        lambda d, p: ({"model": {"config": {**TINY_LLAMA, "max_position_embeddings": 32}}}, []),
        ("seq_len 64 is above the model's max_position_embeddings 32",),
    ),
    "tokenizer_model_vocab_mismatch": (
        "bad input: config",
        lambda d, p: ({"model": {"config": {**TINY_LLAMA, "vocab_size": 500}}}, []),
        ("768 tokens", "vocabulary only 500"),
    ),
    "replay_cache_from_another_model": (
        "bad input: config",
        lambda d, p: ({"replay": {"strategy": "tm", "cache": str(other_models_cache(d, p))}}, []),
        ("built for another model",),
    ),
    "remote_code_not_run": (
        "security",
        lambda d, p: ({"model": {"config": None, "path": str(remote_code_model(d))}}, []),
        ("trust_remote_code",),
    ),
    "pickled_weights_not_loaded": (
        "security",
        lambda d, p: ({"model": {"config": None, "path": str(pickled_weights_model(d))}}, []),
        ("no *.safetensors weights",),
    ),
}


@pytest.mark.parametrize("name", cases(TRAIN_CASES))
def test_bad_training_config_or_model(name, prep, tmp_path, lost):
    _, case, needles = TRAIN_CASES[name]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')  # an earlier run's log
    before = digest(run)
    sections, overrides = case(tmp_path, prep)
    config = write_config(tmp_path / "cpt.yaml", prep, run, **sections)
    result = train_cli(config, *overrides)
    assert lost(len(set(before.items()) ^ set(digest(run).items()))) == 0
    one_line_error(result, needles)
    assert not (tmp_path / "code_ran").exists()


def test_with_init_from_the_base_weights_are_checked_only_where_a_teacher_reads_them(prep, tmp_path):
    """The base (model.path) of an init_from run is read for its config alone unless KD or KL replay loads it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.config import load_train_config
    from pipeline.train import check_inputs

    earlier = tmp_path / "earlier_run"
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(str(earlier))
    config = write_config(
        tmp_path / "cpt.yaml",
        prep,
        tmp_path / "run",
        model={"config": None, "path": str(pickled_weights_model(tmp_path))},
        init_from=str(earlier),
    )
    check_inputs(load_train_config(config))  # pickled base weights, never read: accepted
    from cpt_core.errors import UserError

    with pytest.raises(UserError, match=r"no \*\.safetensors weights"):
        check_inputs(load_train_config(config, ["kd.weight=1"]))
