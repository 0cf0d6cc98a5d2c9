"""The embedded default, end to end: sample corpora → tokenizer → prepare, no download needed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from cpt_core.atomic import write_text

from .config import load_config
from .prepare import prepare
from .sample import SMALL, SampleSizes, train_sample_tokenizer, write_sample_corpora

log = logging.getLogger(__name__)


def demo_config(small: bool, workers: int, tokenizer: str = "tokenizer/spm.model") -> dict[str, Any]:
    """The prep config the demo runs (paths relative to the demo directory)."""
    return {
        "tokenizer": tokenizer,
        "out": "prep",
        "seq_len": 256 if small else 512,
        "seed": 1234,
        "docs_per_chunk": 64 if small else 256,
        "workers": workers,
        "max_reject_fraction": 0.01,
        "sources": [
            {"name": "stdlib_code", "role": "domain", "paths": ["corpora/domain.jsonl.gz"]},
            {"name": "python_docs", "role": "general", "paths": ["corpora/general.jsonl.gz"]},
            {"name": "docstring_qa", "role": "instruction", "paths": ["corpora/instruction.jsonl"]},
        ],
        "mix": {"general_ratio": 0.15, "instruction_ratio": 0.0, "batch_rows": 32},
        "replay": {
            "source": "python_docs",
            "num_samples": 16 if small else 500,  # left out of training: the general corpus is small
            "replay_len": 256 if small else 512,
            "selection": "random",
        },
        "holdout": {"fraction": 0.05, "max_docs": 200},
    }


def write_demo_inputs(out: Path, small: bool = False, tokenizer: bool = True) -> Path:
    """The sample corpora under ``out/corpora`` and (``tokenizer``) a SentencePiece model trained on them, each
    written once; returns the tokenizer's path."""
    sizes: SampleSizes = SMALL if small else SampleSizes()
    corpora = write_sample_corpora(out / "corpora", sizes)
    model = out / "tokenizer" / "spm.model"
    if tokenizer and not model.is_file():
        train_sample_tokenizer([corpora["domain"], corpora["general"]], model, sizes.vocab_size)
        log.info("demo: trained a %d-piece SentencePiece tokenizer → %s", sizes.vocab_size, model)
    return model


def build_demo_data(
    out: Path, small: bool = False, workers: int = 2, quiet: bool = False, tokenizer: str | None = None
) -> dict[str, Any]:
    """Corpora, a tokenizer (``tokenizer``, e.g. a user's model directory, or one trained here), prepare."""
    model = write_demo_inputs(out, small, tokenizer=tokenizer is None)
    config_path = out / "prep.yaml"
    config = demo_config(small, workers, str(Path(tokenizer).resolve()) if tokenizer else str(model.relative_to(out)))
    write_text(config_path, yaml.safe_dump(config, sort_keys=False))
    return prepare(load_config(config_path), quiet=quiet)
