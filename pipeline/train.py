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
    from data_prep.errors import UserError, out_of_space
    from pipeline.distributed import finish, init_distributed
    from pipeline.trainer import Trainer

    init_distributed()

    try:
        trainer = Trainer(cfg)
    except USER_ERRORS as e:
        log.error("%s", one_line(e))
        return 2
    try:
        result = trainer.train()
    except UserError as e:  # not USER_ERRORS: a ValueError raised mid-training is a bug and keeps its traceback
        log.error("%s", one_line(e))
        return 2
    except OSError as e:
        if not out_of_space(e):
            raise
        log.error("%s: no space left on the device; the last complete checkpoint is intact", e.filename or cfg.run_dir)
        return 2
    finish()
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
