"""Training config: one YAML file, ``--set key.path=value`` overrides, validated with clear errors.

Each field is declared once below, with its type (``Literal`` for a choice),
default and meaning; the loader (``cpt_core.typed_config``) validates against
those declarations and ``python -m pipeline.train --help-config`` prints them.
Stage presets fill the peak lr the user leaves out. Paths are relative to the
config file.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cpt_core.errors import ConfigError
from cpt_core.typed_config import apply_overrides, build, read_yaml, reference, setting

log = logging.getLogger(__name__)

Stage = Literal["cpt", "sft", "mixed"]
STAGE_LR: dict[str, float] = {"cpt": 2e-5, "sft": 1e-6, "mixed": 2e-5}
ReplayStrategy = Literal["none", "ce", "kl", "l1", "l2", "tm"]
CACHED_STRATEGIES = ("tm", "l1", "l2")  # the strategies that read the GeRe cache


@dataclass
class ModelConfig:
    """The model trained: a local Hugging Face checkpoint, or a from-scratch config (tests, demo)."""

    path: str | None = setting(None, "local Hugging Face checkpoint directory (model and tokenizer)")
    config: dict[str, Any] | None = setting(None, "or LlamaConfig fields for a from-scratch model")
    seed: int = setting(0, "init seed with `config`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "auto: what the DeepSpeed JSON enables, else bf16 on CUDA and fp32 on CPU"
    )
    gradient_checkpointing: bool = setting(False, "recompute activations in backward (less memory, ~30% slower)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = setting(
        "sdpa", "attention kernel; packed rows stay per-document with every one"
    )
    trust_remote_code: bool = setting(False, "run Python code shipped with model.path (only for checkpoints you trust)")
    chunked_loss: bool = setting(
        True, "CE and KD from hidden states, the output head applied a chunk of tokens at a time (no full logits)"
    )


@dataclass
class DataConfig:
    """Where the training rows come from."""

    prep: str = setting("", "data_prep output directory (its prep.json names mixture, replay shard, holdouts)")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule: linear warmup, then decay to a floor."""

    lr: float | None = setting(None, "peak learning rate; null takes the stage preset (cpt/mixed 2e-5, sft 1e-6)")
    min_lr_ratio: float = setting(0.1, "decay floor as a share of the peak")
    warmup_steps: int | None = setting(None, "warmup length in steps; null: warmup_ratio of the total")
    warmup_ratio: float = setting(0.02, "warmup length as a share of the total steps")
    decay: Literal["cosine", "linear", "constant", "wsd"] = setting(
        "cosine", "after warmup: decay to the floor (cosine, linear), constant, or wsd (stable, then decay)"
    )
    wsd_decay_fraction: float = setting(0.1, "wsd: share of the total steps the final decay takes")
    wsd_decay_shape: Literal["linear", "cosine", "1-sqrt"] = setting("1-sqrt", "wsd: shape of the final decay")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "global gradient-norm clip; 0 turns it off")


@dataclass
class BatchConfig:
    """How a step's rows are split; global batch = micro_batch × grad_accum × ranks."""

    micro_batch: int = setting(1, "rows per rank per forward")
    grad_accum: int = setting(1, "forwards per optimizer step")


@dataclass
class ReplayConfig:
    """The replay term of the objective (pipeline/losses/objective.py): GeRe and the strategies it compares."""

    strategy: ReplayStrategy = setting(
        "none",
        "none | ce (replay CE) | kl (to the base model) | l1/l2 (cached "
        "features) | tm (GeRe threshold margin on cached 2-bit states)",
    )
    weight: float | Literal["dynamic"] = setting(1.0, "multiplies the strategy's term; dynamic: CE / term (detached)")
    max_weight: float = setting(100.0, "cap of the dynamic weight: CE / term explodes as the term nears 0")
    ce_weight: float = setting(1.0, "weight of next-token CE on the replay rows (GeRe trains on them too); 0: off")
    samples_per_step: int = setting(
        4,
        "replay samples per global batch, any number on any ranks; fewer than ranks × grad_accum go to a subset "
        "of the micro-batches, weighted so the gradient is their mean",
    )
    cache: str | None = setting(None, "GeRe cache directory from `python -m pipeline.gere` (tm, l1, l2)")
    kl_temperature: float = setting(1.0, "softmax temperature of the kl strategy (the term is scaled by T²)")
    fused_tm: bool | None = setting(None, "null: the Triton TM kernel on CUDA, the PyTorch reference elsewhere")
    forward: Literal["auto", "joint", "separate"] = setting(
        "auto",
        "joint: replay samples ride in the task rows' forward, each in its own packed slot (one ZeRO-3 gather, "
        "not two); separate: their own padded forward; auto: joint where it is exact to rounding and cheap "
        "(needs the chunked head loss, replay_len <= seq_len, <= 10% empty slots, and CPU or flash attention; "
        "kl: CPU), else separate",
    )


@dataclass
class KDConfig:
    """Knowledge distillation from the frozen base model on the task rows."""

    weight: float = setting(0.0, "weight of KL(base || model) per loss token; 0 turns distillation off")
    temperature: float = setting(1.0, "softmax temperature (the term is scaled by T²)")
    rows: Literal["all", "general"] = setting("all", "which task rows are distilled")


@dataclass
class PenaltyConfig:
    """A pull toward the initial weights after every step (pipeline/training/penalty.py)."""

    kind: Literal["none", "l2sp", "ewc"] = setting("none", "l2sp: uniform pull; ewc: weighted by the diagonal Fisher")
    weight: float = setting(0.0, "pull strength toward the initial weights, per unit lr")
    ewc_batches: int = setting(8, "replay batches the diagonal Fisher (ewc) is estimated on")


@dataclass
class ForgettingConfig:
    """A forgetting budget the trainer holds (pipeline/training/budget.py): it scales anti-forgetting weights,
    then the lr. Or, with ``watch``, only the probe's measurement."""

    budget: float | None = setting(
        None, "allowed rise of general perplexity on the prep's probe documents, e.g. 0.02; null: off"
    )
    watch: bool = setting(
        False,
        "with budget null: probe every `every` steps and log the rise (forgetting/probe_rise, probe_rise_se) "
        "without touching the weights or the lr, the forgetting curve of a run with fixed weights; with a "
        "budget it is logged anyway, so watch must stay false",
    )
    every: int = setting(50, "steps between probe measurements (all ranks, one forward per seq_len window)")
    probe_docs: int = setting(
        64,
        "probe documents scored whole (the first ones of PREP/probe; replay.probe_docs in prep); the logged "
        "probe_rise_se says how much the rise depends on which documents these are",
    )
    gain: float = setting(
        0.5,
        "step of the controller's level per unit of relative error: u += gain · (projected rise − budget) / budget",
    )
    lookahead: float = setting(
        0.0,
        "probe intervals a climbing rise is projected ahead at its last rate before it is compared with the "
        "budget (projected = rise + lookahead · max(rise − previous rise, 0); a falling rise is taken as "
        "measured); 0: act on the rise as measured",
    )
    proportional: float = setting(
        0.0,
        "the levers read the level plus proportional · (projected rise − budget) / budget, the error of the last "
        "probe, beside the integral: the rise accumulates past steps, and an integral alone on it overshoots "
        "and winds up; 0: integral only",
    )
    release: float = setting(
        1.0,
        "share of the proportional term applied while the projected rise is under the budget: 1 releases as "
        "fast as it brakes; 0 brakes only and leaves the release to the integral (the first probe's rise is 0 "
        "because nothing has been trained yet, not because the weights are too high, and forgetting let in by "
        "a release falls back slowly)",
    )
    margin: float = setting(
        0.0,
        "standard errors of the probe's rise (over its documents, logged as probe_rise_se) added to it before "
        "it is compared with the budget: 1 holds a one-sided 84% upper bound, so that the rise of the source "
        "the probe was drawn from, not only of these documents, stays under the budget; 0: hold the probe's rise",
    )
    cautious_start: bool = setting(
        False,
        "start at full protection (weights at max_scale, lr at min_lr_scale) and release while the probe stays "
        "under budget, for an lr at which the steps before the first probe can spend the budget; false: start "
        "at scale 1 and full lr",
    )
    min_scale: float = setting(0.01, "floor of the scale on the anti-forgetting weights")
    max_scale: float = setting(100.0, "ceiling of the scale")
    min_lr_scale: float = setting(
        0.05, "floor of the lr brake: past max_scale the controller lowers the lr, down to this fraction; 1: never"
    )

    @property
    def probe_setting(self) -> str:
        """The setting the probe runs for, as its errors name it."""
        return "forgetting.budget" if self.budget is not None else "forgetting.watch"


@dataclass
class AdapterConfig:
    """Train low-rank adapters (PEFT's LoRA) on a frozen base instead of every weight.

    The base with its adapters off is the teacher of KD and replay KL, so no second copy is built."""

    kind: Literal["none", "lora"] = setting("none", "none: train every weight; lora: train LoRA adapters only")
    r: int = setting(16, "LoRA rank")
    alpha: float = setting(32.0, "LoRA alpha: the update is scaled by alpha / r")
    dropout: float = setting(0.0, "dropout on the adapters' input")
    target_modules: tuple[str, ...] = setting(
        (), "module names the adapters wrap (e.g. q_proj, v_proj); empty: every linear layer but the output head"
    )
    modules_to_save: tuple[str, ...] = setting(
        (), "modules trained in full beside the adapters (a trained copy; the base keeps its own), e.g. norm"
    )


@dataclass
class DistributedConfig:
    """The process group every rank joins."""

    timeout_minutes: float = setting(
        30.0, "how long a collective waits for the slowest rank before the run fails (NCCL's default is 10)"
    )


@dataclass
class CheckpointConfig:
    """When checkpoints are written and which one a run resumes from."""

    every: int = setting(0, "steps between checkpoints; 0: only at the end")
    keep_last: int = setting(2, "complete checkpoints kept")
    resume: str = setting("auto", "auto (the newest complete one) | never | a checkpoint directory")
    signal_save_budget: float = setting(
        20.0,
        "on SIGTERM/SIGINT, save only if this run's last save took at most this many seconds: the deepspeed "
        "launcher kills ranks 30 s after it is signalled (train_slurm.sbatch, with no launcher, sets 240 for "
        "its 300 s of warning), and a save cut off is wasted time",
    )


@dataclass
class LogConfig:
    """Metrics: metrics.jsonl always, TensorBoard optionally."""

    every: int = setting(1, "steps between metric lines")
    every_s: float = setting(
        60.0, "a progress line in the log at least this often (seconds) when stderr is not a terminal (batch logs)"
    )
    tensorboard: bool = setting(True, "also write TensorBoard events under run_dir/tb")
    peak_tflops: float | None = setting(None, "device peak for MFU; null: known GPUs by name, none on CPU")


@dataclass
class EvalConfig:
    """Holdout perplexity during training (the full report is `python -m pipeline.eval`)."""

    every: int = setting(0, "steps between evaluations; 0: at the end only")
    max_docs: int = setting(64, "documents per holdout split")
    mcq: tuple[str, ...] = setting(
        (), "multiple-choice files (MMLU CSV or jsonl) scored base vs tuned in cpt run's report card"
    )


@dataclass
class TrainConfig:
    """A training run: continued pretraining, instruction tuning, or both."""

    run_dir: str = setting("runs/train", "output directory: checkpoints, metrics.jsonl, TensorBoard")
    stage: Stage = setting("cpt", "lr preset: cpt and mixed 2e-5, sft 1e-6")
    steps: int | None = setting(None, "total optimizer steps (or tokens)")
    tokens: int | None = setting(None, "total tokens, rounded up to whole steps (or steps)")
    seed: int = setting(0, "seed of the data order and replay sampling")
    deepspeed: str = setting("ds_configs/zero3_cpu.json", "DeepSpeed JSON; batch, lr and schedule are filled from here")
    init_from: str | None = setting(None, "weights of an earlier run (HF dir): new optimizer, schedule, data position")
    model: ModelConfig = setting(factory=ModelConfig)
    data: DataConfig = setting(factory=DataConfig)
    optim: OptimConfig = setting(factory=OptimConfig)
    batch: BatchConfig = setting(factory=BatchConfig)
    replay: ReplayConfig = setting(factory=ReplayConfig)
    kd: KDConfig = setting(factory=KDConfig)
    penalty: PenaltyConfig = setting(factory=PenaltyConfig)
    adapter: AdapterConfig = setting(factory=AdapterConfig)
    forgetting: ForgettingConfig = setting(factory=ForgettingConfig)
    distributed: DistributedConfig = setting(factory=DistributedConfig)
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig)
    log: LogConfig = setting(factory=LogConfig)
    eval: EvalConfig = setting(factory=EvalConfig)

    @property
    def peak_lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else STAGE_LR[self.stage]


PATH_FIELDS = {("run_dir",), ("deepspeed",), ("init_from",), ("model", "path"), ("data", "prep"), ("replay", "cache")}


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML), apply ``key.path=value`` overrides, resolve paths, validate."""
    raw = read_yaml(path) if path is not None else {}
    apply_overrides(raw, overrides)
    cfg = build(TrainConfig, raw, origin=str(path) if path is not None else "", overridden=overridden_keys(overrides))
    resolve_paths(cfg, Path(path).parent if path is not None else Path.cwd())
    validate(cfg)
    return cfg


def overridden_keys(overrides: list[str] | tuple[str, ...]) -> frozenset[str]:
    """The dotted keys that ``--set key=value`` overrides name (their errors blame ``--set``, not the file)."""
    return frozenset(item.partition("=")[0].strip() for item in overrides)


def resolve_paths(cfg: TrainConfig, base: Path) -> None:
    """Make the config's relative paths relative to ``base`` (the config file's directory)."""
    for fields in PATH_FIELDS:
        holder = cfg
        for f in fields[:-1]:
            holder = getattr(holder, f)
        value = getattr(holder, fields[-1])
        if value is not None and value != "" and not Path(value).is_absolute():
            setattr(holder, fields[-1], str(base / value))


def config_reference() -> str:
    """Every training-config key with its type, default and meaning (``--help-config``, docs/config.md)."""
    return reference(TrainConfig, "Training config (`pipeline.train --config`)")


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A validated config from a dict as ``to_dict`` writes it (paths already resolved), e.g. a checkpoint's."""
    cfg = build(TrainConfig, raw)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Raise the first of :func:`problems`."""
    found = problems(cfg)
    if found:
        raise ConfigError(found[0])


def problems(cfg: TrainConfig) -> list[str]:
    """Rules that span fields or bound a number (types and choices were checked on load), every one broken."""
    found: list[str] = []

    def need(ok: bool, name: str, value: Any, rule: str) -> None:
        if not ok:
            found.append(f"{name} must be {rule}, got {value!r}")

    need((cfg.steps is None) != (cfg.tokens is None), "steps/tokens", (cfg.steps, cfg.tokens), "exactly one set")
    need(cfg.steps is None or cfg.steps > 0, "steps", cfg.steps, "> 0")
    need(cfg.tokens is None or cfg.tokens > 0, "tokens", cfg.tokens, "> 0")
    need(cfg.peak_lr > 0, "optim.lr", cfg.optim.lr, "> 0")
    need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", cfg.optim.min_lr_ratio, "in [0, 1]")
    need(
        cfg.optim.warmup_steps is None or cfg.optim.warmup_steps >= 0,
        "optim.warmup_steps",
        cfg.optim.warmup_steps,
        ">= 0",
    )
    need(0 <= cfg.optim.warmup_ratio < 1, "optim.warmup_ratio", cfg.optim.warmup_ratio, "in [0, 1)")
    need(0 < cfg.optim.wsd_decay_fraction <= 1, "optim.wsd_decay_fraction", cfg.optim.wsd_decay_fraction, "in (0, 1]")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", cfg.optim.grad_clip, ">= 0")
    need(cfg.batch.micro_batch >= 1, "batch.micro_batch", cfg.batch.micro_batch, ">= 1")
    need(cfg.batch.grad_accum >= 1, "batch.grad_accum", cfg.batch.grad_accum, ">= 1")
    need(bool(cfg.data.prep), "data.prep", cfg.data.prep, "the data_prep output directory")
    need(
        (cfg.model.path is None) != (cfg.model.config is None),
        "model",
        (cfg.model.path, cfg.model.config),
        "exactly one of model.path or model.config",
    )
    need(cfg.replay.samples_per_step >= 1, "replay.samples_per_step", cfg.replay.samples_per_step, ">= 1")
    need(
        cfg.replay.strategy not in CACHED_STRATEGIES or bool(cfg.replay.cache),
        "replay.cache",
        cfg.replay.cache,
        f"set for replay.strategy '{cfg.replay.strategy}'",
    )
    need(cfg.replay.weight == "dynamic" or cfg.replay.weight >= 0, "replay.weight", cfg.replay.weight, ">= 0")
    need(cfg.replay.max_weight > 0, "replay.max_weight", cfg.replay.max_weight, "> 0")
    need(cfg.replay.ce_weight >= 0, "replay.ce_weight", cfg.replay.ce_weight, ">= 0")
    need(cfg.replay.kl_temperature > 0, "replay.kl_temperature", cfg.replay.kl_temperature, "> 0")
    need(cfg.kd.weight >= 0, "kd.weight", cfg.kd.weight, ">= 0")
    need(cfg.kd.temperature > 0, "kd.temperature", cfg.kd.temperature, "> 0")
    need(cfg.penalty.ewc_batches >= 1, "penalty.ewc_batches", cfg.penalty.ewc_batches, ">= 1")
    need(cfg.penalty.weight >= 0, "penalty.weight", cfg.penalty.weight, ">= 0")
    if cfg.adapter.kind != "none":
        adapter = cfg.adapter
        need(adapter.r >= 1, "adapter.r", adapter.r, ">= 1")
        need(adapter.alpha > 0, "adapter.alpha", adapter.alpha, "> 0")
        need(0 <= adapter.dropout < 1, "adapter.dropout", adapter.dropout, "in [0, 1)")
        # the adapters sit on the start weights, so their teacher would be init_from, not the base model
        need(
            not (cfg.init_from and (cfg.kd.weight > 0 or cfg.replay.strategy == "kl")),
            "init_from",
            cfg.init_from,
            "unset with an adapter and a teacher (kd.weight > 0 or replay.strategy kl): the adapters' teacher is "
            "the weights they sit on",
        )
    budget = cfg.forgetting
    if budget.budget is not None or budget.watch:
        need(budget.every >= 1, "forgetting.every", budget.every, ">= 1")
        need(budget.probe_docs >= 1, "forgetting.probe_docs", budget.probe_docs, ">= 1")
    # one meaning per setting: a watch with a budget would control, not only measure
    need(budget.budget is None or not budget.watch, "forgetting.watch", budget.watch, "false when a budget is set")
    if budget.budget is not None:
        need(budget.budget > 0, "forgetting.budget", budget.budget, "> 0")
        weight = cfg.replay.weight
        replay_term = cfg.replay.strategy not in ("none", "ce") and (weight == "dynamic" or weight > 0)
        replay_ce = cfg.replay.strategy != "none" and cfg.replay.ce_weight > 0
        need(
            replay_term or replay_ce or cfg.kd.weight > 0,
            "forgetting.budget",
            budget.budget,
            "set with something to scale: a replay term (tm, l1, l2, kl), replay CE (ce_weight > 0) or kd.weight > 0",
        )
        need(budget.gain > 0, "forgetting.gain", budget.gain, "> 0")
        need(budget.lookahead >= 0, "forgetting.lookahead", budget.lookahead, ">= 0")
        need(budget.proportional >= 0, "forgetting.proportional", budget.proportional, ">= 0")
        need(0 <= budget.release <= 1, "forgetting.release", budget.release, "in [0, 1]")
        need(budget.margin >= 0, "forgetting.margin", budget.margin, ">= 0")
        need(0 < budget.min_scale <= 1 <= budget.max_scale, "forgetting scales", budget, "min <= 1 <= max, min > 0")
        need(0 < budget.min_lr_scale <= 1, "forgetting.min_lr_scale", budget.min_lr_scale, "in (0, 1]")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last, ">= 1")
    need(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, ">= 0")
    need(cfg.log.every >= 1, "log.every", cfg.log.every, ">= 1")
    need(
        cfg.distributed.timeout_minutes > 0,
        "distributed.timeout_minutes",
        cfg.distributed.timeout_minutes,
        "> 0",
    )
    need(cfg.log.every_s > 0, "log.every_s", cfg.log.every_s, "> 0")
    return found


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
