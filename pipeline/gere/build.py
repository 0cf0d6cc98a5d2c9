"""Build a GeRe cache for a base model and a replay shard: the one function the CLI, benches and tests call.

TM is exactly 0 at step 1 only if the replay forward in training reproduces the
cached states bit for bit, so the cache should be built the way training runs:
``build_cache_for_training`` takes the training config and uses its dtype,
attention implementation, device, replay rows per forward and layout (their
own forward, or packed behind the task rows: ``joint.py``), under the run's
DeepSpeed JSON (ZeRO-3, stripped of its optimizer) when launched on N ranks.
On one process the model runs on this rank's accelerator (cuda:0 on a GPU node).
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cpt_core.errors import ConfigError, UserError
from data_prep.prep_dir import PrepDir
from data_prep.replay import ReplayShard
from data_prep.tokenizer import load_tokenizer

from ..config import CACHED_STRATEGIES, TrainConfig, load_train_config
from ..runtime.distributed import init_distributed, local_device
from ..runtime.ds_config import filled_ds_config, inference_ds_config
from ..runtime.model import (
    ModelSource,
    final_hidden_states,
    hidden_size,
    load_causal_lm,
    model_config,
    model_fingerprint,
    model_sources,
)
from ..runtime.precision import resolve_precision
from .cache import CacheMismatch, GeReCache, build_cache
from .joint import ReplayLayout, filler_task_rows, joint_hidden, replay_layout
from .sampler import replay_plan

log = logging.getLogger(__name__)


def build_gere_cache(
    source: ModelSource,
    replay_dir: str | Path,
    out: str | Path,
    *,
    batch_size: int = 4,
    features: bool = False,
    ds_config: dict[str, Any] | None = None,
    attn_implementation: str = "sdpa",
    training: TrainConfig | None = None,
) -> Path:
    """Run ``source`` over every replay sample and write thresholds + 2-bit states (+ features) to ``out``.

    With ``ds_config`` the model is partitioned (ZeRO-3) over the launched ranks; DeepSpeed gets the config
    without its optimizer, so building never allocates optimizer state. With ``training``, the samples are
    laid out as that run's replay forward lays them out (``replay.forward``; ``pipeline/gere/joint.py``).
    """
    shard = ReplayShard.open(replay_dir)
    rows = shard.rows()
    if ds_config:
        import deepspeed  # only the multi-rank path needs it (seconds to import)

        # this rank's device first, then the process group
        init_distributed(training.distributed.timeout_minutes if training else 30.0)
        ds_config = inference_ds_config(ds_config)
    device = local_device()
    model = load_causal_lm(source, ds_config, attn_implementation)
    model.eval()
    if ds_config:
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        module = engine.module
    else:
        module = model.to(device)
    top = max((max(r) for r in rows["input_ids"] if r), default=-1)
    if top >= module.config.vocab_size:
        raise UserError(
            f"{replay_dir}: token id {top} is outside the model's vocabulary of "
            f"{module.config.vocab_size}; the replay shard was built with another tokenizer"
        )
    built_with: dict[str, Any] = {"dtype": source.dtype, "attn_implementation": attn_implementation}
    hidden_fn = partial(final_hidden_states, module)
    world = dist.get_world_size() if dist.is_initialized() else 1
    layout = training_layout(training, world, device.type, module) if training is not None else None
    if layout is not None:
        task_rows = training.batch.micro_batch
        hidden_fn = partial(_joint_hidden, module, layout, task_rows, attn_implementation)
        built_with.update(layout="joint", task_rows=task_rows, seq_len=layout.seq_len)
    return build_cache(
        hidden_fn,
        rows["input_ids"],
        rows["id"],
        out,
        hidden_size=module.config.hidden_size,
        replay_len=shard.replay_len,
        batch_size=batch_size,
        model_fingerprint=model_fingerprint(source),
        tokenizer_fingerprint=shard.tokenizer_fingerprint,
        device=device,
        features=features,
        built_with=built_with,
    )


def training_layout(cfg: TrainConfig, world: int, device_type: str, model: Any = None) -> ReplayLayout | None:
    """The layout ``cfg``'s run on ``world`` ranks of ``device_type`` gives its replay samples
    (``replay.forward``, :func:`replay_layout`; None: their own forward).

    It depends on whether the model's loss runs from hidden states: ``model``'s head, or, without one, that of
    the base model's architecture built on the meta device (no weights read).
    """
    from transformers import AutoModelForCausalLM

    from ..losses.head import loss_from_hidden  # imports deepspeed (seconds): only for a training config

    if model is None:
        base, _ = model_sources(cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(base), trust_remote_code=base.trust_remote_code)
    prep = PrepDir(cfg.data.prep).read()
    if prep.replay is None:
        return None
    replay_len = ReplayShard.open(prep.replay).replay_len
    return replay_layout(cfg, replay_len, prep.seq_len, world, loss_from_hidden(cfg, model), device_type)


def _joint_hidden(
    model: Any, layout: ReplayLayout, task_rows: int, attn_implementation: str, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Replay samples' states from a forward of training's shape: ``task_rows`` filler rows, then the samples."""
    filler, positions = filler_task_rows(task_rows, layout.seq_len, ids.device)
    return joint_hidden(model, filler, positions, ids, layout, attn_implementation)[1]


def build_cache_for_training(cfg: TrainConfig, features: bool = False) -> Path:
    """The cache ``cfg.replay.cache`` names, built as that run's replay forward will run.

    Launch it with the training run's number of ranks: the replay rows per forward then follow
    ``replay_plan`` as in training.
    """
    if cfg.replay.strategy not in CACHED_STRATEGIES or not cfg.replay.cache:
        raise ConfigError(f"replay.strategy '{cfg.replay.strategy}' with replay.cache set is needed to build a cache")
    resolve_precision(cfg)
    prep = PrepDir(cfg.data.prep).read()
    if prep.replay is None:
        raise UserError(f"{cfg.data.prep}: no replay shard in prep.json")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    base, _ = model_sources(cfg)
    ds_config = filled_ds_config(cfg, world, hidden_size(base)) if world > 1 else None
    per_forward, _ = replay_plan(cfg.replay.samples_per_step, world, cfg.batch.grad_accum)
    log.info(
        "GeRe cache as training runs it: %s, %s, %d replay rows per forward, %d rank(s)",
        cfg.model.dtype,
        cfg.model.attn_implementation,
        per_forward,
        world,
    )
    out = build_gere_cache(
        base,
        prep.replay,
        cfg.replay.cache,
        batch_size=per_forward,
        features=features,
        ds_config=ds_config,
        attn_implementation=cfg.model.attn_implementation,
        training=cfg,
    )
    if dist.is_initialized():
        dist.barrier()  # every rank returns once rank 0 has moved the cache into place
    return out


def built_in_own_forward(meta: dict[str, Any]) -> bool:
    """Whether a cache was built with each replay batch in a forward of its own (caches from before the joint
    layout recorded no layout, and were)."""
    return meta.get("built_with", {}).get("layout", "separate") == "separate"


def cache_is_current(config: Path, ranks: int) -> bool:
    """Whether the cache the training config ``config`` names exists and was built for its base model, tokenizer
    and replay forward on ``ranks`` ranks: a caller that builds caches on demand (the demo, bench.forgetting) builds
    again when not, instead of training into :class:`CacheMismatch` or a cache of another layout."""
    cfg = load_train_config(config)
    resolve_precision(cfg)
    prep = PrepDir(cfg.data.prep).read()
    try:
        cache = GeReCache.open(
            cfg.replay.cache,
            model_fingerprint(ModelSource(path=cfg.model.path)),
            load_tokenizer(prep.tokenizer).fingerprint,
        )
    except (CacheMismatch, FileNotFoundError):
        return False
    return not differs_from_training(cache.meta, cfg, ranks, training_layout(cfg, ranks, local_device().type))


def differs_from_training(meta: dict[str, Any], cfg: TrainConfig, world: int, layout: ReplayLayout | None) -> list[str]:
    """How the cache was built differently from how ``cfg`` on ``world`` ranks runs its replay forward with
    ``layout`` (None: their own forward); empty: the same."""
    per_forward, _ = replay_plan(cfg.replay.samples_per_step, world, cfg.batch.grad_accum)
    built = {**meta.get("built_with", {}), "layout": "separate" if built_in_own_forward(meta) else "joint"}
    wanted: dict[str, Any] = {
        "dtype": cfg.model.dtype,
        "attn_implementation": cfg.model.attn_implementation,
        "batch_size": per_forward,
        "layout": "separate" if layout is None else "joint",
    }
    if layout is not None:
        wanted.update(task_rows=cfg.batch.micro_batch, seq_len=layout.seq_len)
    return [f"{key} {built.get(key)} (training: {value})" for key, value in wanted.items() if built.get(key) != value]
