"""Rank-0 metrics: a progress bar, JSONL lines and TensorBoard scalars; other ranks stay quiet."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, tensorboard: bool) -> None:
        self.enabled = rank == 0
        self._bar = self._tb = self._jsonl = None
        if not self.enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to metrics.jsonl only")
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                         disable=not sys.stderr.isatty(), dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "lr", "tok_s")},
                              refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        for h in (self._bar, self._tb, self._jsonl):
            if h is not None:
                h.close()
