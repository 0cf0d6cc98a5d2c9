"""Build the GeRe cache: ``python -m pipeline.gere --replay PREP/replay --model-path BASE --out CACHE``.

Runs as one process, or as N ranks under the launcher with a ZeRO-3 config
(for a base model too big for one device):

    deepspeed --num_gpus 8 -m pipeline.gere --replay prep/replay --model-path base/ \\
        --deepspeed ds_configs/zero3_bf16.json --out runs/gere_cache
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from pipeline.config import USER_ERRORS, one_line

log = logging.getLogger("pipeline.gere")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.gere", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-path", help="base model: a local Hugging Face checkpoint directory")
    src.add_argument("--model-config", help="base model from scratch: JSON file of LlamaConfig fields (tests, demo)")
    p.add_argument("--seed", type=int, default=0, help="init seed with --model-config")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python code shipped with --model-path (only for checkpoints you trust)")
    p.add_argument("--replay", required=True, help="replay shard from `data_prep replay` (holds replay.json)")
    p.add_argument("--out", required=True, help="cache directory to write")
    p.add_argument("--batch-size", type=int, default=4, help="replay samples per forward per rank")
    p.add_argument("--features", action="store_true",
                   help="also store bf16 hidden states (for l1/l2 replay; 8x the size of the 2-bit states)")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (ZeRO-3 partitions the model across ranks)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        build_from_args(args)
    except USER_ERRORS as e:
        log.error("%s", one_line(e))
        return 2
    return 0


def build_from_args(args: argparse.Namespace) -> Path:
    import datasets

    from pipeline.gere.cache import build_cache
    from pipeline.model import ModelSource, final_hidden_states, load_causal_lm, model_fingerprint

    replay_dir = Path(args.replay)
    if not (replay_dir / "replay.json").is_file():
        raise FileNotFoundError(f"{replay_dir}: no replay.json; build the shard with `python -m data_prep replay`")
    replay_meta = json.loads((replay_dir / "replay.json").read_text())
    rows = datasets.load_from_disk(str(replay_dir / "data"))
    if args.model_config:
        config = json.loads(Path(args.model_config).read_text())
        source = ModelSource(config=config, seed=args.seed)
    else:
        source = ModelSource(path=args.model_path, trust_remote_code=args.trust_remote_code)
    ds_config = json.loads(Path(args.deepspeed).read_text()) if args.deepspeed else None
    device = torch.device("cpu")
    if ds_config:
        import deepspeed

        from pipeline.distributed import init_distributed

        init_distributed()
        from deepspeed.accelerator import get_accelerator

        device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
    model = load_causal_lm(source, ds_config)
    model.eval()
    if ds_config:
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        module = engine.module
    else:
        module = model.to(device)
    hidden = module.config.hidden_size
    top = max((max(r) for r in rows["input_ids"] if r), default=-1)
    if top >= module.config.vocab_size:
        raise ValueError(f"{replay_dir}: token id {top} is outside the model's vocabulary of "
                         f"{module.config.vocab_size}; the replay shard was built with another tokenizer")
    return build_cache(lambda ids, mask: final_hidden_states(module, ids, mask), rows["input_ids"], rows["id"],
                       args.out, hidden_size=hidden, replay_len=replay_meta["replay_len"],
                       batch_size=args.batch_size, model_fingerprint=model_fingerprint(source),
                       tokenizer_fingerprint=replay_meta["tokenizer_fingerprint"], device=device,
                       features=args.features)


if __name__ == "__main__":
    sys.exit(main())
