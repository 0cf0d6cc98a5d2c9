"""Loading the causal LM: a local Hugging Face checkpoint or a from-scratch config, ZeRO-3 aware.

Under ZeRO-3, transformers' documented integration (a live ``HfDeepSpeedConfig``)
makes ``from_pretrained`` build the model inside ``deepspeed.zero.Init``, so no
rank ever holds a full checkpoint's weights. Weights load
from safetensors only and no remote code runs unless the caller asks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.integrations import HfDeepSpeedConfig

from cpt_core.errors import UserError

if TYPE_CHECKING:
    from ..config import TrainConfig

HEAD_TAIL_BYTES = 4 << 20


@dataclass(frozen=True)
class ModelSource:
    """Where the base model comes from: ``path`` (HF checkpoint dir) or ``config`` (Llama kwargs + seed)."""

    path: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = "float32"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if (self.path is None) == (not self.config):
            raise UserError("model: give exactly one of 'path' (HF checkpoint dir) or 'config' (from scratch)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise UserError(f"model.dtype must be float32, bfloat16 or float16, got '{self.dtype}'")


def load_causal_lm(
    source: ModelSource, ds_config: dict[str, Any] | None = None, attn_implementation: str = "sdpa"
) -> torch.nn.Module:
    """The model, partitioned at construction when ``ds_config`` enables ZeRO-3."""
    dtype = getattr(torch, source.dtype)
    if source.path is not None:
        check_loadable(source)
        keep_alive = _zero3_context(ds_config)  # noqa: F841  transformers reads it through a weak reference
        return AutoModelForCausalLM.from_pretrained(
            str(source.path),
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            attn_implementation=attn_implementation,
            trust_remote_code=source.trust_remote_code,
        )
    # A from-scratch model is small by nature (tests, demo): built whole from its seed on every rank and
    # partitioned by deepspeed.initialize, so its weights are the same with or without ZeRO-3.
    torch.manual_seed(source.seed)
    config = (
        LlamaConfig(**source.config) if "model_type" not in source.config else AutoConfig.for_model(**source.config)
    )
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def model_config(source: ModelSource) -> Any:
    """The model's transformers config (no weights are read)."""
    if source.path is None:
        return (
            LlamaConfig(**source.config) if "model_type" not in source.config else AutoConfig.for_model(**source.config)
        )
    return pretrained_config(source)


def hidden_size(source: ModelSource) -> int:
    """The model's hidden size, from its config alone."""
    return int(model_config(source).get_text_config().hidden_size)


def check_loadable(source: ModelSource) -> None:
    """What :func:`load_causal_lm` refuses, found without reading a weight: no config.json, code the
    checkpoint ships that the user has not trusted, or pickled weights only (unpickling can run code).
    Cheap, so entry points call it before any process group forms."""
    if source.path is None:
        return
    pretrained_config(source)
    if not any(Path(source.path).glob("*.safetensors")):
        raise UserError(
            f"{source.path}: no *.safetensors weights; pickled weights (*.bin, *.pt) are never loaded "
            "(convert them once, where you trust them, with save_pretrained(safe_serialization=True))"
        )


def pretrained_config(source: ModelSource) -> Any:
    """The checkpoint's config (a config.json alone will do: the memory planner needs no weights); refusing
    to run code it ships is a user error naming the setting."""
    path = Path(source.path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=source.trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise UserError(
            f"{path}: the model ships its own Python code, which is not run unless you trust it: set "
            "model.trust_remote_code: true (only for checkpoints you trust)"
        ) from None


def model_fingerprint(source: ModelSource) -> str:
    """Identifies the base weights: config + per file size and first/last 4 MB (or config + seed).

    Cheap enough to check at every start on a 100 GB checkpoint; it tells apart
    models and checkpoints, not a single edited weight in the middle of a file.
    """
    h = hashlib.sha256()
    if source.path is None:
        h.update(
            json.dumps({"config": source.config, "seed": source.seed, "dtype": source.dtype}, sort_keys=True).encode()
        )
        return h.hexdigest()[:16]
    path = Path(source.path)
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            h.update(f.name.encode())
            size = f.stat().st_size
            h.update(str(size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(HEAD_TAIL_BYTES))
                if size > 2 * HEAD_TAIL_BYTES:
                    fh.seek(-HEAD_TAIL_BYTES, 2)
                    h.update(fh.read())
    return h.hexdigest()[:16]


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states after the final norm, without computing logits."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _zero3_context(ds_config: dict[str, Any] | None) -> Any:
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    return HfDeepSpeedConfig(ds_config)


def model_sources(cfg: TrainConfig) -> tuple[ModelSource, ModelSource]:
    """(base, start): the base model (GeRe cache, teacher, fingerprints) and the weights training starts from."""
    model = cfg.model
    base = ModelSource(
        path=model.path,
        config=model.config or {},
        seed=model.seed,
        dtype=model.dtype,
        trust_remote_code=model.trust_remote_code,
    )
    start = (
        ModelSource(path=cfg.init_from, dtype=model.dtype, trust_remote_code=model.trust_remote_code)
        if cfg.init_from
        else base
    )
    return base, start


def needs_teacher(cfg: TrainConfig) -> bool:
    """A frozen copy of the base model is needed: KD, or KL replay."""
    return cfg.kd.weight > 0 or cfg.replay.strategy == "kl"
