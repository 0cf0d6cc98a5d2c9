"""The run file: one YAML for a whole run, checked in seconds with every problem reported at once.

Its top level is the training config (``pipeline/config.py``) with three changes:
``data`` holds the data-prep config (``data_prep/config.py``; ``tokenizer``
defaults to ``model.path`` and ``out`` is the run's ``prep/``), ``deepspeed``
also takes a preset name from ``ds_configs/``, and ``gpus`` and ``export`` are
added. Everything a run writes lands under ``run_dir``. Paths are relative to
the run file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_core.errors import ConfigProblems, UserError
from cpt_core.typed_config import apply_overrides, build, did_you_mean, read_yaml, setting

from .config import CACHED_STRATEGIES, TrainConfig, load_train_config, overridden_keys, problems, resolve_paths

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {p.stem: p for p in sorted((ROOT / "ds_configs").glob("*.json"))}


@dataclass
class RunSection:
    """Keys of a run file beside the training config's."""

    run_dir: str = setting("runs/run", "every output of the run: prep/, gere_cache/, train/, export/")
    gpus: int = setting(1, "ranks on this node (CPU processes where there is no GPU)")


@dataclass
class ExportSection:
    """The exported Hugging Face checkpoint."""

    verify: bool = setting(True, "compare the export's logits with the training checkpoint's")
    max_shard_size: str = setting("5GB", "largest safetensors file")


@dataclass
class MergeSection:
    """Interpolate the tuned model back toward the base after training (cpt merge); off by default."""

    to_budget: float | None = setting(
        None, "the largest share of the change whose general ppl rise on the probe stays within this, e.g. 0.05"
    )
    alpha: float | None = setting(None, "or a fixed share of the change to keep: 0 is the base, 1 the tuned model")

    @property
    def enabled(self) -> bool:
        return self.to_budget is not None or self.alpha is not None


RUN_KEYS = {f.name for f in dataclasses.fields(RunSection)} | {"export", "merge"}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class RunFile:
    """A checked run file: where each stage writes, and the configs the stages read."""

    path: Path
    run_dir: Path
    gpus: int
    prep_raw: dict[str, Any]  # the data-prep config as prepare reads it, paths absolute
    train: TrainConfig  # paths absolute; data.prep, run_dir and replay.cache filled in
    export: ExportSection
    merge: MergeSection

    @property
    def prep_dir(self) -> Path:
        return self.run_dir / "prep"

    @property
    def train_dir(self) -> Path:
        return self.run_dir / "train"

    @property
    def cache_dir(self) -> Path:
        return Path(self.train.replay.cache) if self.train.replay.cache else self.run_dir / "gere_cache"

    @property
    def export_dir(self) -> Path:
        return self.run_dir / "export"

    @property
    def merged_dir(self) -> Path:
        return self.run_dir / "merged"

    @property
    def uses_cache(self) -> bool:
        return self.train.replay.strategy in CACHED_STRATEGIES


def load_run(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), smoke: bool = False, training_only: bool = False
) -> RunFile:
    """The run file at ``path`` with ``--set`` overrides (and smoke-size settings), or a :class:`ConfigProblems`.
    ``training_only``: the data section (corpora, tokenizer) is not checked, as training reads the built prep."""
    run, found = check_run(path, overrides, smoke, training_only)
    if found:
        raise ConfigProblems(found)
    assert run is not None
    return run


def is_run_file(raw: dict[str, Any]) -> bool:
    """A run file names corpora (``data`` without ``prep``) or run-only keys (gpus, export, merge); a training
    config names a prep under ``data.prep``."""
    data = raw.get("data")
    return bool(set(raw) & (RUN_KEYS - TRAIN_KEYS)) or (isinstance(data, dict) and "prep" not in data)


def training_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The training config at ``path`` (None: from ``overrides`` alone), or a run file's training section as
    `cpt run` writes it to RUN_DIR/train.yaml: the training commands and launch scripts take either file. A
    run file's corpora are not checked here: training reads the prep they were built into, and on a cluster
    the corpora need not be on the nodes' shared filesystem."""
    run = run_file(path, overrides) if path is not None else None
    return run.train if run else load_train_config(path, overrides)


def run_file(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunFile | None:
    """The run file at ``path``, checked as training reads it (corpora not checked); None for a training config."""
    return load_run(path, overrides, training_only=True) if is_run_file(read_yaml(Path(path))) else None


def prep_lengths(path: str | Path) -> tuple[int, int] | None:
    """(seq_len, replay_len) a run file's data section asks for, data-prep's defaults where it is silent; None
    for a training config, or where the section's values are not integers (the run file's check says so)."""
    from data_prep.build import BuildOptions
    from data_prep.config import ReplayShardConfig

    raw = read_yaml(Path(path))
    if not is_run_file(raw):
        return None
    data = _mapping(raw, "data")
    replay = data.get("replay")
    seq_len = data.get("seq_len", BuildOptions().seq_len)
    replay_len = (replay if isinstance(replay, dict) else {}).get("replay_len", ReplayShardConfig().replay_len)
    if not all(isinstance(n, int) for n in (seq_len, replay_len)):
        return None
    return seq_len, replay_len


def check_run(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), smoke: bool = False, training_only: bool = False
) -> tuple[RunFile | None, list[str]]:
    """Everything that can be checked without loading a model: keys, types, values, paths, tokenizer vs model."""
    path = Path(path).resolve()  # every relative path in the file is relative to it, whatever the cwd
    raw = read_yaml(path)
    apply_overrides(raw, overrides)
    if smoke:
        raw = smoke_settings(raw)
    base, origin, found = path.parent, str(path), []
    for key in sorted(set(raw) - RUN_KEYS - TRAIN_KEYS):
        found.append(f"{origin}: unknown key '{key}'{did_you_mean(str(key), RUN_KEYS | TRAIN_KEYS)}")
    overridden = overridden_keys(overrides)
    top = build(RunSection, {k: raw[k] for k in ("run_dir", "gpus") if k in raw}, "", origin, found, overridden)
    export = build(ExportSection, raw.get("export") or {}, "export.", origin, found, overridden)
    merge = build(MergeSection, raw.get("merge") or {}, "merge.", origin, found, overridden)
    found += _merge_problems(merge, raw, origin)
    if top is not None and top.gpus < 1:
        found.append(f"{origin}: gpus must be >= 1, got {top.gpus}")
    run_dir = (base / (top.run_dir if top else "runs/run")).resolve()
    if smoke:
        run_dir = run_dir.with_name(run_dir.name + "-smoke")

    train_raw = {k: copy.deepcopy(v) for k, v in raw.items() if k in TRAIN_KEYS and k != "data"}
    train_raw["run_dir"] = str(run_dir / "train")
    train_raw["data"] = {"prep": str(run_dir / "prep")}
    preset = train_raw.get("deepspeed", "zero3_bf16")
    if isinstance(preset, str) and preset in PRESETS:
        train_raw["deepspeed"] = str(PRESETS[preset])
    replay = train_raw.get("replay") or {}
    if isinstance(replay, dict) and replay.get("strategy") in CACHED_STRATEGIES and not replay.get("cache"):
        replay["cache"] = str(run_dir / "gere_cache")
    train = build(TrainConfig, train_raw, "", origin, found, overridden)
    if train is not None:
        resolve_paths(train, base)
        train.eval.mcq = tuple(str(base / f) for f in train.eval.mcq)
        found += [f"{origin}: eval.mcq: {f} is not a file" for f in train.eval.mcq if not Path(f).is_file()]
        found += [f"{origin}: {p}" for p in problems(train)]
    found += _path_problems(raw, base, origin)

    prep_raw = {} if training_only else _prep_section(raw, train, run_dir, base, origin, found)
    if found:
        return None, found
    assert top is not None and train is not None and export is not None and merge is not None
    return RunFile(path, run_dir, top.gpus, prep_raw, train, export, merge), []


def _merge_problems(merge: MergeSection | None, raw: dict[str, Any], origin: str) -> list[str]:
    if merge is None or not merge.enabled:
        return []
    found = []
    if merge.to_budget is not None and merge.alpha is not None:
        found.append(f"{origin}: merge: set to_budget or alpha, not both")
    if merge.alpha is not None and not 0 <= merge.alpha <= 1:
        found.append(f"{origin}: merge.alpha must be in [0, 1], got {merge.alpha}")
    if merge.to_budget is not None and merge.to_budget <= 0:
        found.append(f"{origin}: merge.to_budget must be > 0, got {merge.to_budget}")
    model = _mapping(raw, "model")
    if not model.get("path"):
        found.append(f"{origin}: merge needs a base to merge toward: model.path")
    replay = _mapping(_mapping(raw, "data"), "replay")
    if merge.to_budget is not None and not replay.get("probe_docs"):
        found.append(
            f"{origin}: merge.to_budget scores the prep's probe documents: set data.replay.probe_docs (e.g. 64)"
        )
    return found


def _mapping(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """``raw[key]`` where it is a section; {} otherwise (its type error is reported where the section is built)."""
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _prep_section(
    raw: dict[str, Any], train: TrainConfig | None, run_dir: Path, base: Path, origin: str, found: list[str]
) -> dict[str, Any]:
    """The ``data`` section as prepare reads it; its problems appended to ``found``."""
    from data_prep.config import parse_config
    from data_prep.readers import resolve_inputs

    data = raw.get("data")
    if not isinstance(data, dict):
        found.append(f"{origin}: 'data' must be the data-prep section (sources, mix, replay, holdout), got {data!r}")
        return {}
    prep_raw = copy.deepcopy(data)
    if "out" in prep_raw:
        found.append(f"{origin}: data.out is set by the run: the prep is written to run_dir/prep")
    prep_raw["out"] = str(run_dir / "prep")
    model_path = _mapping(raw, "model").get("path")
    if "tokenizer" not in prep_raw and model_path:
        prep_raw["tokenizer"] = str(base / model_path)
    cfg = parse_config(prep_raw, base=base, origin=f"{origin}: data", errors=found)
    for i, source in enumerate(data.get("sources") or []):
        paths = source.get("paths") if isinstance(source, dict) else None
        for path in [paths] if isinstance(paths, str) else paths if isinstance(paths, list) else []:
            try:
                resolve_inputs([str(base / path)])
            except UserError as e:
                found.append(f"{origin}: data.sources[{i}].paths: {e}")
    if cfg is None:
        return prep_raw
    if not Path(cfg.tokenizer).exists():
        found.append(f"{origin}: data.tokenizer: {cfg.tokenizer} does not exist")
    elif (
        train is not None
        and train.model.path
        and Path(train.model.path, "config.json").is_file()
        and Path(cfg.tokenizer).resolve() != Path(train.model.path).resolve()  # a model and its own tokenizer agree
    ):
        found += _vocabulary_problems(cfg.tokenizer, Path(train.model.path), origin)
    if train is not None and train.replay.strategy != "none" and cfg.replay is None:
        found.append(f"{origin}: replay.strategy '{train.replay.strategy}' needs a replay shard: data.replay")
    return {**prep_raw, "tokenizer": cfg.tokenizer, "sources": [_absolute_source(s, base) for s in data["sources"]]}


def _absolute_source(source: dict[str, Any], base: Path) -> dict[str, Any]:
    paths = [source["paths"]] if isinstance(source["paths"], str) else source["paths"]
    return {**source, "paths": [str((base / p).resolve()) for p in paths]}


def _path_problems(raw: dict[str, Any], base: Path, origin: str) -> list[str]:
    """Files the training config names, checked from the raw values so a type error elsewhere hides none."""
    found = []
    deepspeed = raw.get("deepspeed", "zero3_bf16")
    if isinstance(deepspeed, str) and deepspeed not in PRESETS and not (base / deepspeed).is_file():
        presets = ", ".join(PRESETS)
        found.append(f"{origin}: deepspeed: {deepspeed} is neither a preset ({presets}) nor a JSON file")
    model = _mapping(raw, "model")
    if isinstance(model.get("path"), str) and not (base / model["path"] / "config.json").is_file():
        found.append(f"{origin}: model.path: {model['path']} is not a Hugging Face model directory (no config.json)")
    if isinstance(raw.get("init_from"), str) and not (base / raw["init_from"]).is_dir():
        found.append(f"{origin}: init_from: {raw['init_from']} does not exist")
    return found


def _vocabulary_problems(tokenizer: str, model: Path, origin: str) -> list[str]:
    """A tokenizer whose ids the model's embedding cannot hold fails at the first step on a GPU; say it now."""
    from data_prep.tokenizer import load_tokenizer

    vocab = json.loads((model / "config.json").read_text()).get("vocab_size")
    size = load_tokenizer(tokenizer).vocab_size
    if isinstance(vocab, int) and size > vocab:
        return [f"{origin}: data.tokenizer has {size} tokens but {model}'s embedding holds {vocab}"]
    return []


def smoke_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """The same run at toy size, to check the whole flow on a model and corpora in minutes."""
    raw = copy.deepcopy(raw)
    data = raw.get("data")
    if isinstance(data, dict):
        seq_len = min(int(data.get("seq_len", 2048)), 128)
        data.update(seq_len=seq_len, docs_per_chunk=64)
        for source in data.get("sources") or []:
            if isinstance(source, dict):
                source["max_docs"] = 300
        data["mix"] = {**(data.get("mix") or {}), "batch_rows": 4}
        if data.get("replay") is not False and data.get("replay", {}) is not None:
            probe = 8 if (raw.get("merge") or {}).get("to_budget") is not None else 0  # merge.to_budget scores them
            data["replay"] = {
                **(data.get("replay") or {}),
                "num_samples": 8,
                "replay_len": seq_len,
                "probe_docs": probe,
            }
        data["holdout"] = {**(data.get("holdout") or {}), "fraction": 0.05, "max_docs": 16}
    raw.pop("tokens", None)
    raw["steps"] = 4
    raw["batch"] = {"micro_batch": 1, "grad_accum": 1}
    raw["checkpoint"] = {**(raw.get("checkpoint") or {}), "every": 0, "keep_last": 1}
    raw["eval"] = {"every": 0, "max_docs": 8}
    raw["forgetting"] = {"budget": None}
    if isinstance(raw.get("replay"), dict):
        raw["replay"]["samples_per_step"] = int(raw.get("gpus", 1))
    raw.setdefault("optim", {})
    if isinstance(raw["optim"], dict):
        raw["optim"].update(warmup_steps=1)
        raw["optim"].pop("warmup_ratio", None)
    return raw
