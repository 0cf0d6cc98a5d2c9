"""Build a GeRe cache for a base model and a replay shard: the one function the CLI, benches and tests call.

One process on one device, or N ranks with a ZeRO-3 DeepSpeed config (for a
base model too big for one device; every rank runs every batch and rank 0
writes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from data_prep.errors import UserError
from data_prep.replay import ReplayShard

from ..distributed import init_distributed
from ..model import ModelSource, final_hidden_states, load_causal_lm, model_fingerprint
from .cache import build_cache


def build_gere_cache(
    source: ModelSource,
    replay_dir: str | Path,
    out: str | Path,
    *,
    batch_size: int = 4,
    features: bool = False,
    ds_config: dict[str, Any] | None = None,
) -> Path:
    """Run ``source`` over every replay sample and write thresholds + 2-bit states (+ features) to ``out``."""
    shard = ReplayShard.open(replay_dir)
    rows = shard.rows()
    device = torch.device("cpu")
    if ds_config:
        import deepspeed  # only the multi-rank path needs it (seconds to import)
        from deepspeed.accelerator import get_accelerator

        init_distributed()
        device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
    model = load_causal_lm(source, ds_config)
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
    return build_cache(
        lambda ids, mask: final_hidden_states(module, ids, mask),
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
    )
