"""Continued pretraining / instruction tuning: ``deepspeed [--num_gpus N] --module pipeline.train --config cpt.yaml``.

Also runs as one plain process (``python -m pipeline.train --config ...``).
Overrides: ``--set optim.lr=1e-5 --set steps=200``. See README: Training.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from cpt_core.commands import prog
from cpt_core.errors import run_cli
from cpt_core.logs import process_rank, setup_logging
from pipeline.config import TrainConfig, config_reference
from pipeline.runfile import training_config

log = logging.getLogger("pipeline.train")


def check_inputs(cfg: TrainConfig) -> None:
    """The DeepSpeed JSON's, the prep's and the model directories' refusals, in seconds: on a cluster every rank
    would otherwise pay for its imports and the process group (and NCCL's start) before saying them."""

    from data_prep.prep_dir import PrepDir
    from pipeline.runtime.ds_json import read_ds_json

    read_ds_json(cfg.deepspeed)  # present, JSON, and nothing in it that would fail on the nodes
    PrepDir(cfg.data.prep).read()
    if process_rank() == 0:
        from pipeline.launch import warn_stale_build_locks

        warn_stale_build_locks(log)
    if not (cfg.model.path or cfg.init_from):
        return
    from pipeline.runtime.model import ModelSource, check_loadable, needs_teacher, pretrained_config  # transformers

    def source(path: str) -> ModelSource:
        return ModelSource(path=path, trust_remote_code=cfg.model.trust_remote_code)

    check_loadable(source(cfg.init_from or cfg.model.path))  # the weights training starts from
    if cfg.init_from and cfg.model.path:
        # the base's weights are read only by a teacher (KD, KL replay); otherwise its config.json is enough
        # (the GeRe cache's fingerprint, export's architecture)
        if needs_teacher(cfg):
            check_loadable(source(cfg.model.path))
        else:
            pretrained_config(source(cfg.model.path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("pipeline.train"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="training YAML, or the run file (paths relative to it)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--help-config", action="store_true", help="print every config key (type, default, meaning)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = p.parse_args(argv)
    if args.help_config:
        print(config_reference())
        return 0
    setup_logging()

    def body() -> None:
        cfg = training_config(args.config, args.set)  # a bad config fails before any process group forms,
        check_inputs(cfg)  # and so does a missing prep or a model directory that would be refused
        from pipeline.runtime.distributed import finish, init_distributed
        from pipeline.training.trainer import Trainer  # deepspeed and transformers: seconds to import

        init_distributed(cfg.distributed.timeout_minutes)
        result = Trainer(cfg).train()
        finish()
        if process_rank() == 0:
            print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}, sort_keys=True))

    return run_cli(body, log, disk_full="no space left on the device; the last complete checkpoint is intact")


if __name__ == "__main__":
    sys.exit(main())
