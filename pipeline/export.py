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

from .checkpoint.files import CheckpointDir, verify_checkpoint
from .cli_args import export_parser
from .config import config_from_dict
from .runtime.distributed import init_distributed
from .runtime.ds_config import filled_ds_config
from .training.adapter import uses_adapter
from .training.adapter_export import base_tensors, merged_tensors, write_peft_adapter

log = logging.getLogger("pipeline.export")

# How far the export's logits may be from the engine's: fp32 absolute; 16-bit relative to the largest logit,
# since the two run the same weights through kernels that may round differently (GPU).
VERIFY_TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 3e-3}


class ExportMismatch(UserError):
    """The exported model's logits differ from the checkpoint's engine: the export is not kept."""


def export(
    checkpoint: Path,
    out: Path,
    verify: bool = False,
    max_shard_size: str | int = "5GB",
    adapter_out: str | None = None,
) -> float | None:
    """Write ``out``; with ``verify``, returns the max |logit difference| to the engine (else None).

    ``adapter_out``: for an adapter run, also the adapter alone in PEFT's format, in that subdirectory of ``out``.
    """
    _check_replaceable(out)
    cfg = _run_config(checkpoint)
    if adapter_out is not None and not uses_adapter(cfg.get("adapter")):
        raise UserError(f"{checkpoint}: --adapter-out needs an adapter run, and this one trained every weight")
    config = _architecture_config(cfg)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        dtype = getattr(torch, cfg["model"]["dtype"])
        trained = checkpoint_tensors(checkpoint)  # read once: the weights and the adapter alone both come from it
        write_weights(run_tensors(trained, checkpoint, cfg), checkpoint, config, dtype, tmp, max_shard_size)
        if adapter_out is not None:
            write_peft_adapter(trained, config, cfg, dtype, tmp / adapter_out)
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

    An adapter run's logits come from its base with the checkpoint's adapters merged by PEFT; above the limit
    its tensors are compared with the merge recomputed from the checkpoint.
    """
    cfg_dict = _run_config(checkpoint)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(_architecture_config(cfg_dict)).parameters())
    if n_params > VERIFY_ENGINE_MAX_PARAMS:
        tensors = run_tensors(checkpoint_tensors(checkpoint), checkpoint, cfg_dict)
        return verify_tensors(tensors, checkpoint, exported_dir, getattr(torch, cfg_dict["model"]["dtype"])), 1.0
    if uses_adapter(cfg_dict.get("adapter")):
        return _verify_adapter_logits(checkpoint, exported_dir, cfg_dict)
    return _verify_logits(checkpoint, exported_dir, cfg_dict)


def verify_tensors(lazy: dict[str, Any], checkpoint: Path, exported_dir: Path, dtype: torch.dtype) -> float:
    """The largest |difference| between each exported tensor and ``lazy``'s (the checkpoint's, made when read),
    one tensor in memory at a time; a tensor missing on either side is a mismatch."""
    from safetensors import safe_open

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
    ds_cfg.get("checkpoint", {}).pop("writer", None)  # it saves nothing: no writer processes
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
    return _logit_difference(engine, exported.to(engine.device).eval(), engine.device)


def _verify_adapter_logits(checkpoint: Path, exported_dir: Path, cfg_dict: dict[str, Any]) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) of the exported model vs the run's base with the checkpoint's
    adapters injected and merged by PEFT's own code (``BaseTunerLayer.merge``), independent of the export's
    streamed merge. Merged, not run as adapters: ``W x + s B A x`` rounds differently from ``(W + s B A) x``
    (by 2e-4 of the largest logit on SmolLM2 in fp32), which would hide a lost adapter under the tolerance."""
    from .runtime.distributed import local_device
    from .runtime.model import load_causal_lm, model_sources
    from .training.adapter import add_adapters, lora_layers

    cfg = config_from_dict(cfg_dict)
    model = load_causal_lm(model_sources(cfg)[1], attn_implementation=cfg.model.attn_implementation)
    add_adapters(model, cfg.adapter, cfg.seed)
    trained = checkpoint_tensors(checkpoint)
    unexpected = model.load_state_dict({k: v.contiguous() for k, v in trained.items()}, strict=False).unexpected_keys
    if unexpected:
        raise ExportMismatch(f"{checkpoint}: tensors the adapted model does not have, e.g. {unexpected[:3]}")
    for module in lora_layers(model):
        module.merge()
    device = local_device()
    exported = AutoModelForCausalLM.from_pretrained(str(exported_dir), local_files_only=True, dtype=model.dtype)
    return _logit_difference(model.to(device).eval(), exported.to(device).eval(), device)


def _logit_difference(reference: Any, exported: Any, device: torch.device) -> tuple[float, float]:
    """(max |logit difference|, max |logit|) of two models on one probe sequence."""
    probe = torch.arange(2, 2 + 32, device=device).remainder(exported.config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        a = reference(input_ids=probe, use_cache=False).logits.float()
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


def checkpoint_tensors(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's fp32 weights by name, each joined from the ZeRO-3 partitions only when read (DeepSpeed's
    lazy view): at 8B the partitions (32 GB) and one tensor, never the model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name, lazy_mode=True)


def run_tensors(trained: dict[str, Any], checkpoint: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The weights the run's model computes with, by name and made when read: the checkpoint's ``trained``
    tensors, or for an adapter run its base merged with them (``pipeline/training/adapter_export.py``)."""
    if not uses_adapter(cfg.get("adapter")):
        return trained
    return merged_tensors(base_tensors(cfg), trained, cfg["adapter"], str(checkpoint))


def write_weights(
    tensors: dict[str, Any], origin: Path, config: Any, dtype: torch.dtype, out: Path, max_shard_size: str | int = "5GB"
) -> None:
    """``tensors`` (made when read, like DeepSpeed's lazy view of the ZeRO-3 partitions) as safetensors shards in
    ``dtype``, one shard in memory at a time, so the export never builds the model or a full state dict.

    Names and shapes are checked first against the architecture built on the meta device (no memory); a tied
    output embedding is not written twice (the config ties it on load). ``origin`` names the checkpoint in errors.
    """
    from deepspeed.utils.zero_to_fp32 import to_torch_tensor
    from huggingface_hub import split_torch_state_dict_into_shards

    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(config).state_dict()
    # a tied head is the input embedding: a checkpoint may hold it (ZeRO-3's view) or not (a base's safetensors)
    tied = (
        {k for k in set(tensors) | set(expected) if k.endswith("lm_head.weight")}
        if config.get_text_config().tie_word_embeddings
        else set()
    )
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected) - tied)
    wrong = sorted(
        k for k in set(tensors) & set(expected) - tied if tuple(tensors[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        raise UserError(
            f"{origin}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {wrong[:3]})"
        )
    names = [k for k in tensors if k not in tied]
    empty = {k: torch.empty(tensors[k].shape, dtype=dtype, device="meta") for k in names}
    split = split_torch_state_dict_into_shards(
        empty, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, shard_names in split.filename_to_tensors.items():
        shard = to_torch_tensor({k: tensors[k] for k in shard_names}, dtype=dtype)
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
            diff = export(
                checkpoint,
                Path(args.out),
                verify=args.verify,
                max_shard_size=args.max_shard_size,
                adapter_out=args.adapter_out,
            )
        except ExportMismatch as e:  # a distinct exit code: the checkpoint is fine, its export is not
            log.error("%s", one_line(e))
            return 1
        if diff is not None:
            print(f"max_abs_logit_diff={diff:.3g}")
        return 0

    return run_cli(body, log)


if __name__ == "__main__":
    sys.exit(main())
