"""Continued pretraining / instruction tuning: ``deepspeed [--num_gpus N] --module pipeline.train --config cpt.yaml``.

Also runs as one plain process (``python -m pipeline.train --config ...``).
Overrides: ``--set optim.lr=1e-5 --set steps=200``. See README: Training.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

log = logging.getLogger("pipeline.train")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training YAML (paths relative to it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's calls
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from pipeline.config import USER_ERRORS, load_train_config, one_line

    try:
        cfg = load_train_config(args.config, args.set)
    except USER_ERRORS as e:
        log.error("%s", one_line(e))
        return 2
    _init_distributed()
    from pipeline.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except USER_ERRORS as e:
        log.error("%s", one_line(e))
        return 2
    result = trainer.train()
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}, sort_keys=True))
    return 0


def _init_distributed() -> None:
    """Under the launcher the env is set; a plain process becomes a world of one."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    deepspeed.init_distributed()


if __name__ == "__main__":
    sys.exit(main())
