"""Build the GeRe cache: ``python -m pipeline.gere --config cpt.yaml`` (as that run trains), or by hand:
``python -m pipeline.gere --replay PREP/replay --model-path BASE --out CACHE``.

With ``--config`` the cache goes where ``replay.cache`` says, built with the run's base model, dtype,
attention implementation, replay rows per forward and layout (``replay.forward``), so TM is exactly 0 at
step 1; launch it with the run's number of ranks (``deepspeed --num_gpus 8 -m pipeline.gere --config
cpt.yaml``).

Runs as one process, or as N ranks under the launcher with a ZeRO-3 config
(for a base model too big for one device):

    deepspeed --num_gpus 8 -m pipeline.gere --replay prep/replay --model-path base/ \\
        --deepspeed ds_configs/zero3_bf16.json --out runs/gere_cache
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from cpt_core.commands import prog, renamed
from cpt_core.errors import UserError, run_cli
from cpt_core.logs import setup_logging
from pipeline.runfile import training_config

log = logging.getLogger("pipeline.gere")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("pipeline.gere"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="training YAML: build the cache its replay.cache names, as the run trains")
    src.add_argument("--model", dest="model_path", help="base model: a local Hugging Face checkpoint directory")
    src.add_argument("--model-path", dest="model_path", action=renamed("--model"), help=argparse.SUPPRESS)
    src.add_argument("--model-config", help="base model from scratch: JSON file of LlamaConfig fields (tests, demo)")
    p.add_argument("--seed", type=int, default=0, help="init seed with --model-config")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped with --model (only for checkpoints you trust)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="with --config: override a value")
    p.add_argument("--replay", help="replay shard from `data_prep replay` (holds replay.json); not with --config")
    p.add_argument("--prep", help="or a prep directory: its replay shard; not with --config")
    p.add_argument("--out", help="cache directory to write; not with --config")
    p.add_argument("--batch-size", type=int, default=4, help="replay samples per forward per rank")
    p.add_argument(
        "--features",
        action="store_true",
        help="also store bf16 hidden states (for l1/l2 replay; 8x the size of the 2-bit states)",
    )
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (ZeRO-3 partitions the model across ranks)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    setup_logging()
    return run_cli(lambda: build_from_args(args), log)


def build_from_args(args: argparse.Namespace) -> Path:
    if args.config:
        from pipeline.gere.build import build_cache_for_training  # torch and transformers: after --help

        return build_cache_for_training(training_config(args.config, args.set), features=args.features)
    if args.prep and not args.replay:
        from data_prep.prep_dir import PrepDir

        replay = PrepDir(args.prep).read().replay
        if replay is None:
            raise UserError(f"--prep {args.prep}: the prep has no replay shard (its config's replay section)")
        args.replay = str(replay)
    if not args.replay or not args.out:
        raise UserError("--replay (or --prep) and --out are needed with --model or --model-config")
    from pipeline.gere.build import build_gere_cache  # torch and transformers: after --help, not before
    from pipeline.runtime.ds_json import read_ds_json
    from pipeline.runtime.model import ModelSource

    if args.model_config:
        source = ModelSource(config=json.loads(Path(args.model_config).read_text()), seed=args.seed)
    else:
        source = ModelSource(path=args.model_path, trust_remote_code=args.trust_remote_code)
    ds_config = read_ds_json(args.deepspeed) if args.deepspeed else None
    return build_gere_cache(
        source, args.replay, args.out, batch_size=args.batch_size, features=args.features, ds_config=ds_config
    )


if __name__ == "__main__":
    sys.exit(main())
