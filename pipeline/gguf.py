"""Convert a GGUF checkpoint into a plain Hugging Face directory (fp32 safetensors + tokenizer).

    python -m pipeline.gguf MODEL.gguf --out models/my-model [--max-shard-size 200MB]

transformers reads GGUF through the ``gguf`` package and dequantises every
tensor to fp32, but refuses to ``save_pretrained`` the result (it is marked
quantised). So a fresh model is built from the same config, with the leftover
``quantization_config`` dropped, the dequantised state dict is loaded into it
strictly, and that is saved. The tokenizer (with its chat template) is saved
beside it, so the directory is both model and tokenizer. The output is
written atomically: an interrupted conversion leaves nothing that looks done.

The weights are the dequantised 4/5-bit values, not the original bf16 ones:
good enough to fine-tune and to test on, not to compare against published
scores.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt_core.atomic import atomic_path
from cpt_core.errors import UserError, run_cli
from cpt_core.logs import setup_logging
from pipeline.cli_args import gguf_parser

log = logging.getLogger("pipeline.gguf")


def convert_gguf(
    gguf_file: str | Path, out: str | Path, max_shard_size: str | int = "5GB", tokenizer_only: bool = False
) -> Path:
    """Write ``out`` as a Hugging Face model + tokenizer directory (or the tokenizer alone) from ``gguf_file``."""
    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise UserError(f"{gguf_file}: GGUF file not found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        if tokenizer_only:
            with atomic_path(out) as tmp:
                tokenizer.save_pretrained(str(tmp))
            return out
        quantised = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as e:  # how transformers reports a file it cannot read
        raise UserError(f"{gguf_file}: transformers cannot read this GGUF file: {e}") from None
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(tmp))
    log.info(
        "converted %s → %s (%.0fM parameters, fp32)", gguf_file, out, sum(p.numel() for p in model.parameters()) / 1e6
    )
    return out


def main(argv: list[str] | None = None) -> int:
    args = gguf_parser().parse_args(argv)
    setup_logging()
    return run_cli(lambda: convert_gguf(args.gguf, args.out, args.max_shard_size), log)


if __name__ == "__main__":
    sys.exit(main())
