"""Training config: one YAML file, ``--set key.path=value`` overrides, validated with clear errors.

Stage presets fill what the user leaves out: ``cpt`` (peak lr 2e-5), ``sft``
(peak lr 1e-6; loss on response tokens, as the packed rows' loss_mask says),
``mixed`` (both kinds of rows in one run, peak lr 2e-5). Paths are relative to
the config file. Every error names the field and the bad value.
"""
from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from data_prep.errors import UserError

log = logging.getLogger(__name__)

# What the CLIs print as one line and exit 2 on: bad config, input or environment, not a bug.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, UserError)


def one_line(error: BaseException) -> str:
    """An error message as one log line (some libraries' messages span several)."""
    return " ".join(str(error).split())

STAGE_LR = {"cpt": 2e-5, "sft": 1e-6, "mixed": 2e-5}


@dataclass
class ModelConfig:
    path: str | None = None  # local Hugging Face checkpoint dir
    config: dict[str, Any] | None = None  # or LlamaConfig fields for a from-scratch model (tests, demo)
    seed: int = 0  # init seed with ``config``
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; auto: bf16 on CUDA, fp32 on CPU (pipeline/precision.py)
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2; packed rows stay per-document in all
    trust_remote_code: bool = False  # run Python code shipped with model.path (only for checkpoints you trust)


@dataclass
class DataConfig:
    prep: str = ""  # data_prep output dir (holds prep.json: mixture, replay, holdout)


@dataclass
class OptimConfig:
    lr: float | None = None  # peak; None takes the stage preset
    min_lr_ratio: float = 0.1  # decay floor as a share of the peak
    warmup_steps: int | None = None  # or warmup_ratio of the total steps
    warmup_ratio: float = 0.02
    decay: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class BatchConfig:
    micro_batch: int = 1  # rows per rank per forward
    grad_accum: int = 1  # forwards per optimizer step; global batch = micro_batch × grad_accum × ranks


@dataclass
class ReplayConfig:
    strategy: str = "none"  # none | ce | kl | l1 | l2 | tm
    weight: Union[float, str] = 1.0  # a number, or "dynamic" (CE / term)
    samples_per_step: int = 4  # replay samples per global batch
    cache: str | None = None  # GeRe cache dir (tm, l1, l2)
    kl_temperature: float = 1.0
    fused_tm: bool | None = None  # None: Triton kernel on CUDA, reference elsewhere


@dataclass
class KDConfig:
    weight: float = 0.0  # 0 turns distillation off
    temperature: float = 1.0
    rows: str = "all"  # all | general: which task rows are distilled


@dataclass
class PenaltyConfig:
    kind: str = "none"  # none | l2sp | ewc
    weight: float = 0.0  # decoupled pull strength toward the initial weights, per unit lr
    ewc_batches: int = 8  # replay batches the diagonal Fisher (ewc) is estimated on


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0: only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <checkpoint dir>


@dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = True
    peak_tflops: float | None = None  # device peak for MFU; None: known GPUs by name, nothing on CPU


@dataclass
class EvalConfig:
    every: int = 0  # steps; 0: at the end only
    max_docs: int = 64  # per holdout split


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    stage: str = "cpt"
    steps: int | None = None  # total optimizer steps, or
    tokens: int | None = None  # total tokens (rounded up to whole steps)
    seed: int = 0
    deepspeed: str = "ds_configs/zero3_cpu.json"
    init_from: str | None = None  # weights of an earlier run (HF dir): new optimizer, schedule, data position
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    penalty: PenaltyConfig = field(default_factory=PenaltyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def peak_lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else STAGE_LR[self.stage]


PATH_FIELDS = {("run_dir",), ("deepspeed",), ("init_from",), ("model", "path"), ("data", "prep"), ("replay", "cache")}


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML), apply ``key.path=value`` overrides, resolve paths, validate."""
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ValueError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ValueError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        base = path.parent
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override '{item}' must look like key.path=value")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(value)
    cfg = _build(TrainConfig, raw, "")
    for fields in PATH_FIELDS:
        holder = cfg
        for f in fields[:-1]:
            holder = getattr(holder, f)
        value = getattr(holder, fields[-1])
        if value is not None and value != "" and not Path(value).is_absolute():
            setattr(holder, fields[-1], str(base / value))
    validate(cfg)
    return cfg


def resolve_precision(cfg: TrainConfig) -> None:
    """Replace ``model.dtype: auto`` by the concrete dtype (see pipeline/precision.py), and log it."""
    from .precision import resolve_dtype

    requested = cfg.model.dtype
    cfg.model.dtype = resolve_dtype(requested, cfg.deepspeed)
    log.info("precision: %s (model.dtype: %s, %s)", cfg.model.dtype, requested, Path(cfg.deepspeed).name)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A validated config from a dict as ``to_dict`` writes it (paths already resolved), e.g. a checkpoint's."""
    cfg = _build(TrainConfig, raw, "")
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    def need(ok: bool, name: str, value: Any, rule: str) -> None:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {value!r}")

    need(cfg.stage in STAGE_LR, "stage", cfg.stage, f"one of {sorted(STAGE_LR)}")
    need((cfg.steps is None) != (cfg.tokens is None), "steps/tokens", (cfg.steps, cfg.tokens), "exactly one set")
    need(cfg.steps is None or cfg.steps > 0, "steps", cfg.steps, "> 0")
    need(cfg.tokens is None or cfg.tokens > 0, "tokens", cfg.tokens, "> 0")
    need(cfg.peak_lr > 0, "optim.lr", cfg.optim.lr, "> 0")
    need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", cfg.optim.min_lr_ratio, "in [0, 1]")
    need(cfg.optim.decay in ("cosine", "linear", "constant"), "optim.decay", cfg.optim.decay, "cosine|linear|constant")
    need(cfg.optim.warmup_steps is None or cfg.optim.warmup_steps >= 0, "optim.warmup_steps",
         cfg.optim.warmup_steps, ">= 0")
    need(0 <= cfg.optim.warmup_ratio < 1, "optim.warmup_ratio", cfg.optim.warmup_ratio, "in [0, 1)")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", cfg.optim.grad_clip, ">= 0")
    need(cfg.batch.micro_batch >= 1, "batch.micro_batch", cfg.batch.micro_batch, ">= 1")
    need(cfg.batch.grad_accum >= 1, "batch.grad_accum", cfg.batch.grad_accum, ">= 1")
    need(bool(cfg.data.prep), "data.prep", cfg.data.prep, "the data_prep output directory")
    need((cfg.model.path is None) != (cfg.model.config is None), "model", (cfg.model.path, cfg.model.config),
         "exactly one of model.path or model.config")
    need(cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype", cfg.model.dtype,
         "auto|float32|bfloat16|float16")
    need(cfg.replay.samples_per_step >= 1, "replay.samples_per_step", cfg.replay.samples_per_step, ">= 1")
    need(cfg.replay.strategy not in ("tm", "l1", "l2") or bool(cfg.replay.cache), "replay.cache", cfg.replay.cache,
         f"set for replay.strategy '{cfg.replay.strategy}'")
    need(cfg.kd.weight >= 0, "kd.weight", cfg.kd.weight, ">= 0")
    need(cfg.kd.temperature > 0, "kd.temperature", cfg.kd.temperature, "> 0")
    need(cfg.kd.rows in ("all", "general"), "kd.rows", cfg.kd.rows, "all|general")
    need(cfg.penalty.kind in ("none", "l2sp", "ewc"), "penalty.kind", cfg.penalty.kind, "none|l2sp|ewc")
    need(cfg.penalty.ewc_batches >= 1, "penalty.ewc_batches", cfg.penalty.ewc_batches, ">= 1")
    need(cfg.penalty.weight >= 0, "penalty.weight", cfg.penalty.weight, ">= 0")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last, ">= 1")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, ">= 0")
    need(cfg.log.every >= 1, "log.every", cfg.log.every, ">= 1")
    from pipeline.losses.replay import ReplayLossConfig

    ReplayLossConfig(cfg.replay.strategy, cfg.replay.weight, cfg.replay.kl_temperature, cfg.replay.fused_tm)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _build(cls: Any, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(fields))})")
    values = {}
    for name, value in raw.items():
        f = fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hints[name], f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` checked against the field's type annotation (and made a float where one is due)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _coerce(value, option, name)
                except ValueError:
                    pass
        raise ValueError(f"{name} must be {_describe(annotation)}, got {value!r}")
    if value is None:
        raise ValueError(f"{name} must not be null")
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    elif annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif annotation in (str, bool) and isinstance(value, annotation):
        return value
    elif typing.get_origin(annotation) is dict and isinstance(value, dict):
        return value
    raise ValueError(f"{name} must be {_describe(annotation)}, got {value!r}")


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    return "a mapping" if origin is dict else {float: "a number", int: "an integer", str: "a string",
                                                  bool: "true or false"}.get(annotation, str(annotation))
