"""Export a training checkpoint as a Hugging Face model directory (safetensors + tokenizer).

    python -m pipeline.export --checkpoint RUN/checkpoints/step00000100 --out RUN/hf [--verify]
    python -m pipeline.export --run RUN --out RUN/hf      # the run's latest complete checkpoint

ZeRO-3 checkpoints hold each rank's partition; DeepSpeed's zero_to_fp32 joins
them one tensor at a time (its lazy mode), and they are written as safetensors
shards (``--max-shard-size``) in the run's dtype, checked by name and shape
against the run's architecture built on the meta device (from its config: the
base weights are never read, and no model is built). The tokenizer travels
along: the tokenizer files of a Hugging Face directory (only those, since
users point the tokenizer at the model directory itself, whose weights must
not overwrite the trained ones), or a SentencePiece model as
``tokenizer.model``. ``--verify`` loads the same checkpoint into a DeepSpeed
engine and checks that both give the same logits on a probe *before* the
export is moved into place: a failed check leaves no directory behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from cpt_core.atomic import atomic_path
from cpt_core.errors import UserError, one_line, run_cli
from cpt_core.logs import setup_logging
from data_prep.prep_dir import PrepDir
from data_prep.tokenizer import HF_TOKENIZER_FILES, save_sentencepiece_as_hf

from .checkpoint_files import CheckpointDir, verify_checkpoint
from .cli_args import export_parser
from .config import config_from_dict
from .distributed import init_distributed
from .ds_config import filled_ds_config

log = logging.getLogger("pipeline.export")

# How far the export's logits may be from the engine's: fp32 absolute; 16-bit relative to the largest logit,
# since the two run the same weights through kernels that may round differently (GPU).
VERIFY_TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 3e-3}


class ExportMismatch(UserError):
    """The exported model's logits differ from the checkpoint's engine: the export is not kept."""


def export(checkpoint: Path, out: Path, verify: bool = False, max_shard_size: str | int = "5GB") -> float | None:
    """Write ``out``; with ``verify``, returns the max |logit difference| to the engine (else None)."""
    _check_replaceable(out)
    cfg = _run_config(checkpoint)
    config = _architecture_config(cfg)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_weights(checkpoint, config, getattr(torch, cfg["model"]["dtype"]), tmp, max_shard_size)
        config.save_pretrained(str(tmp))
        base = cfg.get("init_from") or cfg["model"]["path"]
        if base and (Path(base) / "generation_config.json").is_file():  # bos/eos for generate(); not weights
            shutil.copy2(Path(base) / "generation_config.json", tmp / "generation_config.json")
        tokenizer = PrepDir(cfg["data"]["prep"]).read().tokenizer
        if tokenizer.is_dir():
            for name in HF_TOKENIZER_FILES:
                if (tokenizer / name).is_file():
                    shutil.copy2(tokenizer / name, tmp / name)
        else:
            save_sentencepiece_as_hf(tokenizer, tmp)
            shutil.copy2(tokenizer, tmp / "tokenizer.model")
        diff = None
        if verify:
            diff, largest = verify_export(checkpoint, tmp)
            dtype = cfg["model"]["dtype"]
            limit = VERIFY_TOLERANCE[dtype] * (1.0 if dtype == "float32" else max(largest, 1.0))
            log.info("verify: max |difference| exported vs checkpoint = %.3g (limit %.3g, %s)", diff, limit, dtype)
            if diff > limit:
                raise ExportMismatch(
                    f"{out}: exported logits differ from the checkpoint's engine by {diff:.3g} "
                    f"(> {limit:.3g} in {dtype}); nothing was written"
                )
        (tmp / "training_run.json").write_text(
            json.dumps({"checkpoint": str(checkpoint), "config": cfg}, indent=1, sort_keys=True)
        )
    log.info("exported %s → %s", checkpoint, out)
    return diff


# Above this many parameters --verify compares tensors, not logits: an engine would hold the whole model and its
# optimizer in one process (about 80 GB at 8B on one GPU).
VERIFY_ENGINE_MAX_PARAMS = 1_000_000_000


def verify_export(checkpoint: Path, exported_dir: Path) -> tuple[float, float]:
    """(max |difference|, scale) between the export and the checkpoint named by ``checkpoint`` (its own tag).

    Up to :data:`VERIFY_ENGINE_MAX_PARAMS` parameters: the logits of the exported model against a one-rank
    DeepSpeed engine loaded from the checkpoint (scale: the largest logit), an independent path through the
    training code. Above: every exported tensor against the checkpoint's fp32 partitions joined one tensor at a
    time and cast to the run's dtype, which must be equal (scale 1), in memory bounded by one tensor.
    """
    cfg_dict = _run_config(checkpoint)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(_architecture_config(cfg_dict)).parameters())
    if n_params > VERIFY_ENGINE_MAX_PARAMS:
        return verify_tensors(checkpoint, exported_dir, getattr(torch, cfg_dict["model"]["dtype"])), 1.0
    return _verify_logits(checkpoint, exported_dir, cfg_dict)


def verify_tensors(checkpoint: Path, exported_dir: Path, dtype: torch.dtype) -> float:
    """The largest |difference| between each exported tensor and the checkpoint's, one tensor in memory at a time;
    a tensor missing on either side is a mismatch."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors import safe_open

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name, lazy_mode=True)
    found: set[str] = set()
    largest = 0.0
    for shard in sorted(exported_dir.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                if key not in lazy:
                    raise ExportMismatch(f"{exported_dir}: {key} is not a weight of {checkpoint}")
                ours, theirs = f.get_tensor(key), lazy[key].contiguous().to(dtype)
                if ours.shape != theirs.shape:
                    raise ExportMismatch(f"{exported_dir}: {key} has shape {tuple(ours.shape)}, not {theirs.shape}")
                largest = max(largest, float((ours.float() - theirs.float()).abs().max()))
                found.add(key)
    missing = sorted(k for k in lazy if k not in found and not k.endswith("lm_head.weight"))  # tied: written once
    if missing:
        raise ExportMismatch(f"{exported_dir}: missing {len(missing)} weight(s) of {checkpoint}, e.g. {missing[:3]}")
    return largest


def _verify_logits(checkpoint: Path, exported_dir: Path, cfg_dict: dict[str, Any]) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) of the exported model vs an engine loaded from the checkpoint.

    Both run on the engine's device (this rank's accelerator) in the run's dtype, on the same probe. The engine
    keeps the run's ZeRO stage but not its offload: a client optimizer cannot be offloaded, and only the
    module's weights are loaded.
    """
    import deepspeed  # only --verify builds an engine (seconds to import)

    cfg = config_from_dict(cfg_dict)
    init_distributed(cfg.distributed.timeout_minutes)
    model = AutoModelForCausalLM.from_config(
        _architecture_config(cfg_dict), attn_implementation=cfg.model.attn_implementation
    )  # fresh weights: the engine loads the checkpoint's
    ds_cfg = filled_ds_config(cfg, 1, model.config.get_text_config().hidden_size)
    ds_cfg.pop("optimizer", None)
    zero = ds_cfg.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        zero.pop(key, None)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=ds_cfg,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
    )
    engine.load_checkpoint(
        str(checkpoint.parent), tag=checkpoint.name, load_optimizer_states=False, load_lr_scheduler_states=False
    )
    engine.eval()
    exported = AutoModelForCausalLM.from_pretrained(
        str(exported_dir), local_files_only=True, dtype=getattr(torch, cfg.model.dtype)
    )
    exported = exported.to(engine.device).eval()
    probe = torch.arange(2, 2 + 32, device=engine.device).remainder(exported.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        a = engine(input_ids=probe, use_cache=False).logits.float()
        b = exported(input_ids=probe, use_cache=False).logits.float()
    return float((a - b).abs().max()), float(a.abs().max())


def _run_config(checkpoint: Path) -> dict[str, Any]:
    """The run's config, once every file of the checkpoint has passed verify_checkpoint."""
    verify_checkpoint(checkpoint)
    return CheckpointDir(checkpoint).state()["config"]


def _check_replaceable(out: Path) -> None:
    """Export replaces an earlier export, never a directory of something else."""
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "training_run.json").is_file())):
        raise UserError(f"{out}: exists and is not an earlier export; choose another --out (nothing was written)")


def write_weights(
    checkpoint: Path, config: Any, dtype: torch.dtype, out: Path, max_shard_size: str | int = "5GB"
) -> None:
    """The checkpoint's weights as safetensors shards in ``dtype``, one shard in memory at a time.

    DeepSpeed's lazy view of the ZeRO-3 partitions joins a tensor only when it is written, so the
    export never builds the model or a full state dict: at 8B that is the fp32 partitions (32 GB) and one
    shard, not 80 GB. Names and shapes are checked first against the architecture built on the meta
    device (no memory); a tied output embedding is not written twice (the config ties it on load).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor
    from huggingface_hub import split_torch_state_dict_into_shards

    lazy = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name, lazy_mode=True)
    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(config).state_dict()
    tied = {k for k in lazy if k.endswith("lm_head.weight")} if config.get_text_config().tie_word_embeddings else set()
    missing = sorted(set(expected) - set(lazy) - tied)
    unexpected = sorted(set(lazy) - set(expected))
    wrong = sorted(k for k in set(lazy) & set(expected) - tied if tuple(lazy[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise UserError(
            f"{checkpoint}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {wrong[:3]})"
        )
    names = [k for k in lazy if k not in tied]
    empty = {k: torch.empty(lazy[k].shape, dtype=dtype, device="meta") for k in names}
    split = split_torch_state_dict_into_shards(
        empty, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, tensors in split.filename_to_tensors.items():
        shard = to_torch_tensor({k: lazy[k] for k in tensors}, dtype=dtype)
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out / filename), metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _architecture_config(cfg: dict[str, Any]) -> Any:
    """The run's model config (from the base's config.json, or the from-scratch fields), with its dtype."""
    m = cfg["model"]
    path = cfg.get("init_from") or m["path"]
    if path is None:
        fields = m["config"]
        config = LlamaConfig(**fields) if "model_type" not in fields else AutoConfig.for_model(**fields)
    else:
        config = AutoConfig.from_pretrained(
            path, local_files_only=True, trust_remote_code=m.get("trust_remote_code", False)
        )
    config.dtype = m["dtype"]
    return config


def main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    setup_logging()

    def body() -> int:
        try:
            checkpoint = Path(args.checkpoint) if args.checkpoint else CheckpointDir.latest_of_run(args.run).path
            diff = export(checkpoint, Path(args.out), verify=args.verify, max_shard_size=args.max_shard_size)
        except ExportMismatch as e:  # a distinct exit code: the checkpoint is fine, its export is not
            log.error("%s", one_line(e))
            return 1
        if diff is not None:
            print(f"max_abs_logit_diff={diff:.3g}")
        return 0

    return run_cli(body, log)


if __name__ == "__main__":
    sys.exit(main())
