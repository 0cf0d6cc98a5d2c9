"""Rank-0 metrics: a progress bar, JSONL lines and TensorBoard scalars; other ranks stay quiet."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

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
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; logging to metrics.jsonl only")
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            disable=not sys.stderr.isatty(),
            dynamic_ncols=True,
        )

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k in ("loss", "lr", "tok_s")}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        for h in (self._bar, self._tb, self._jsonl):
            if h is not None:
                h.close()


class PeakMemory:
    """This rank's peak memory above what the process held when it was made (before the model is built).

    That is the figure ``pipeline.plan`` predicts. A running maximum since the start (evals and saves
    included), logged by rank 0 for itself. CUDA: ``max_memory_allocated``, the live tensors
    (the CUDA context and the caching allocator's slack are not in it). CPU: the peak resident set
    (VmHWM) minus the resident set at the start. ``reset_peak`` first forgets earlier peaks (a bench
    measuring one computation; Linux's /proc/self/clear_refs on CPU).
    """

    def __init__(self, device: torch.device, reset_peak: bool = False) -> None:
        self.device = device
        if reset_peak:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # VmHWM := the current resident set
        self.baseline = self._now()

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = status_kb("VmHWM") * 1024
        return (peak - self.baseline) / 1e9

    def _now(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return status_kb("VmRSS") * 1024


def status_kb(field: str) -> int:
    """A /proc/self/status memory field in kB (Linux); 0 elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# Dense bf16 peak of common training GPUs (vendor datasheets, without sparsity), FLOP/s.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def device_peak_flops(override_tflops: float | None = None) -> float | None:
    """The peak to divide by: the configured value, else a known GPU's, else None (no MFU on CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def model_flops_utilization(tokens_per_s: float, n_params: int, peak_flops: float) -> float:
    """MFU with the 6·N FLOPs per token of a dense transformer's forward + backward (attention ignored)."""
    return 6.0 * n_params * tokens_per_s / peak_flops
