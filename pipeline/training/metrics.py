"""Rank-0 metrics: progress (a bar on a terminal, log lines in a batch log), JSONL and TensorBoard; other ranks
stay quiet."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        rank: int,
        total_steps: int,
        start_step: int,
        tensorboard: bool,
        every: int = 1,
        every_s: float = 60.0,
    ) -> None:
        self.enabled = rank == 0
        self._bar = self._tb = self._jsonl = None
        self.progress = ProgressLine(total_steps, start_step, every, every_s)
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

    def advance(self, step: int, values: dict[str, Any]) -> None:
        """One step done: the bar moves on a terminal; elsewhere a progress line when one is due."""
        if not self.enabled:
            return
        if not self._bar.disable:
            self._bar.set_postfix(self.progress.postfix(values), refresh=False)
            self._bar.update(1)
        elif self.progress.due(step):
            log.info("%s", self.progress.line(step, values))

    def close(self) -> None:
        for h in (self._bar, self._tb, self._jsonl):
            if h is not None:
                h.close()


class ProgressLine:
    """A one-line summary of training for logs that are not a terminal (a SLURM .out, nohup).

    Due every ``every`` steps, and at least every ``every_s`` seconds so a slow run never goes quiet;
    the ETA is measured from the steps this process ran, not from a resumed run's earlier ones.
    """

    def __init__(self, total_steps: int, start_step: int, every: int, every_s: float) -> None:
        self.total, self.start, self.every, self.every_s = total_steps, start_step, every, every_s
        self.started = self.last = time.monotonic()

    def due(self, step: int) -> bool:
        now = time.monotonic()
        if step % self.every == 0 or step == self.total or now - self.last >= self.every_s:
            self.last = now
            return True
        return False

    def line(self, step: int, values: dict[str, Any]) -> str:
        parts = [f"step {step}/{self.total}"]
        if "tokens_seen" in values:
            parts.append(f"tokens {_si(values['tokens_seen'])}")
        if "loss" in values:
            components = " ".join(f"{k[5:]} {v:.4g}" for k, v in values.items() if k.startswith("loss/"))
            parts.append(f"loss {values['loss']:.4g}" + (f" ({components})" if components else ""))
        for key, text in (("lr", "lr {:.3g}"), ("grad_norm", "grad {:.3g}"), ("tok_s", "{:.0f} tok/s")):
            if key in values:
                parts.append(text.format(values[key]))
        if "mfu" in values:
            parts.append(f"mfu {100 * values['mfu']:.1f}%")
        if "peak_mem_gb" in values:
            parts.append(f"mem {values['peak_mem_gb']:.2f} GB")
        if "forgetting/probe_rise" in values:
            parts.append(f"probe {100 * values['forgetting/probe_rise']:+.2f}%")
        done = step - self.start
        if 0 < done and step < self.total:
            parts.append(f"eta {_duration((time.monotonic() - self.started) / done * (self.total - step))}")
        return " | ".join(parts)

    def postfix(self, values: dict[str, Any]) -> dict[str, str]:
        keys = ("loss", "lr", "grad_norm", "tok_s", "mfu", "peak_mem_gb")
        return {k: f"{values[k]:.4g}" for k in keys if k in values}


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


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
