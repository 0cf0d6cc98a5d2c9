"""The DeepSpeed engines of a run, built from the training config: the trained model and the frozen teacher.

The trained engine is checked before it is handed out: the tokenizer fits its
vocabulary, the rows fit its positions, and packed documents do not attend to
each other with the configured attention (``pipeline/runtime/isolation.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import deepspeed
import torch

from cpt_core.errors import ConfigError
from data_prep.tokenizer import Tokenizer

from ..checkpoint.manager import signals_held_for_writers, watch_writer
from ..config import TrainConfig
from ..losses.head import attach_head_loss
from ..runtime.ds_config import inference_ds_config
from ..runtime.ds_json import decoupled_writer
from ..runtime.isolation import check_document_isolation
from ..runtime.model import ModelSource, load_causal_lm
from .adapter import AdapterFreeTeacher, add_adapters, uses_adapter

log = logging.getLogger(__name__)

Scheduler = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def build_engine(
    cfg: TrainConfig,
    source: ModelSource,
    ds_cfg: dict[str, Any],
    scheduler: Scheduler,
    tokenizer: Tokenizer,
    seq_len: int,
) -> Any:
    """The trained model under DeepSpeed (ZeRO-3 partitions it at construction), in train mode.

    ``engine.module.head_loss`` exists where the loss can skip the full logits (``pipeline/losses/head.py``).
    """
    model = load_causal_lm(source, ds_cfg, cfg.model.attn_implementation)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, the model's vocabulary only "
            f"{model.config.vocab_size}"
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"data seq_len {seq_len} is above the model's max_position_embeddings {limit}")
    if uses_adapter(cfg.adapter):
        trained = add_adapters(model, cfg.adapter, cfg.seed)
        log.info("adapter: %s r %d on a frozen base, %d parameters trained", cfg.adapter.kind, cfg.adapter.r, trained)
        # The embeddings are frozen, so without this no layer's input carries a gradient, and ZeRO-3's backward
        # hooks (which gather a layer's weights for its backward) then fire late and one at a time: 3x slower
        # steps on SmolLM2 with LoRA on CPU, at the same peak memory. With it, autograd reaches every layer.
        model.enable_input_require_grads()
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    attach_head_loss(model, cfg)  # before initialize: DeepSpeed hooks the modules it finds there
    params = [p for p in model.parameters() if p.requires_grad]
    optim = cfg.optim
    optimizer = (
        None
        if "optimizer" in ds_cfg
        else torch.optim.AdamW(
            params,
            lr=cfg.peak_lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            fused=True,
        )
    )  # one pass, no full-size temporaries
    with signals_held_for_writers(decoupled_writer(ds_cfg)):  # DeepSpeed starts its checkpoint writers in here
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler, config=ds_cfg
        )
    watch_writer(engine, cfg.distributed.timeout_minutes)  # before anything below can fail
    engine.eval()  # no dropout in the probe
    # Replay samples packed behind the task rows (replay.forward) add rows to a forward: probe with one more,
    # so a micro_batch of 1 still checks the multi-row path (flash attention runs rows as one varlen row).
    rows = cfg.batch.micro_batch + (cfg.replay.strategy != "none" and cfg.replay.forward != "separate")
    error = check_document_isolation(
        engine,
        cfg.model.attn_implementation,
        model.config.vocab_size,
        rows,
        getattr(torch, cfg.model.dtype),
        engine.device,
    )
    engine.train()
    log.info(
        "document isolation: %s at %d rows a forward, packed vs alone logits differ by %.1g (relative)",
        cfg.model.attn_implementation,
        rows,
        error,
    )
    return engine


def build_teacher(cfg: TrainConfig, base: ModelSource, ds_cfg: dict[str, Any], trained: Any) -> Any:
    """The frozen base model: the ``trained`` engine with its adapters off, or an inference engine of its own
    (partitioned like the trained one, no optimizer)."""
    if uses_adapter(cfg.adapter):
        return AdapterFreeTeacher(trained)
    inference = inference_ds_config(ds_cfg)
    model = load_causal_lm(base, inference, cfg.model.attn_implementation)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=inference)
    engine.eval()
    return engine
