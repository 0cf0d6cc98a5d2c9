"""Peak memory and time of the loss at a large vocabulary: chunked head loss vs full logits.

    python -m bench.loss_memory [--vocab 131072] [--seq-len 4096] [--rows 1] [--hidden 512] [--device cpu|cuda]

One micro-batch's loss, forward and backward, from final hidden states
``[rows·seq_len, hidden]`` and an output weight ``[vocab, hidden]``, four ways:

    full logits   ``pipeline.losses.linear_ce.linear_ce_kl_reference``: logits = h·Wᵀ,
                  upcast, cross-entropy (and KD's two log-softmaxes), as the
                  trainer computed it before
    chunked       ``linear_ce_kl``, what the trainer runs now

each as task CE alone and as CE + KD (a teacher with the same shapes). With
``--distilled F`` < 1 (``kd.rows: general`` distils the mix's general rows
only, F ≈ 0.15) the teacher covers the first F of the tokens, and a third way,
``chunked, masked``, gives the chunked loss a teacher on every token with its
mask ending there: what the trainer ran before it passed the teacher on the
distilled rows only. Each
way runs in its own process: peak = the process's peak memory during the loss
minus what it held just before (inputs allocated), so the gradients it returns
(``[N, H]`` and ``[V, H]``, needed by any path) are counted in both. CPU: peak
resident set (VmHWM, reset through /proc/self/clear_refs; glibc set to return
freed blocks, ``pipeline.runtime.host_memory``); CUDA: ``max_memory_allocated``. Time:
median of --repeats runs after a warm-up, in the same process.

Last line: ``loss_peak_vs_naive=<x> loss_time_vs_naive=<y>``, the larger of the
CE and CE+KD ratios (goal x <= 0.125, y <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from bench.harness import clock, finish, repeat, sync, table
from pipeline.losses.linear_ce import TeacherHead, linear_ce_kl, linear_ce_kl_reference
from pipeline.runtime.host_memory import return_freed_memory_to_os
from pipeline.training.metrics import PeakMemory

WAYS = {"full logits": linear_ce_kl_reference, "chunked": linear_ce_kl, "chunked, masked": linear_ce_kl}


def measure(way: str, kd: bool, args: argparse.Namespace) -> dict[str, float]:
    """One way, in this process: peak bytes above the inputs during forward + backward, and seconds per run."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n = args.rows * args.seq_len
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, args.hidden, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    targets = torch.randint(0, args.vocab, (n,), generator=g).to(device)
    teacher = None
    if kd:
        m = round(args.distilled * n)  # tokens distilled: the first m
        covered = n if way == "chunked, masked" else m
        teacher = TeacherHead(
            torch.randn(covered, args.hidden, generator=g).to(device, dtype),
            (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device, dtype),
            torch.arange(covered, device=device) < m,
            temperature=2.0,
        )
    fn = WAYS[way]

    def run() -> None:
        loss, _, _ = fn(hidden, weight, targets, teacher, 0.5)
        loss.backward()
        hidden.grad = weight.grad = None

    sync()
    memory = PeakMemory(device, reset_peak=True)
    clock(run)
    peak = memory.peak_gb() * 1e9
    times = repeat(run, args.repeats)
    return {"peak": peak, "time": times.median, "spread": times.spread}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--rows", type=int, default=1, help="rows of seq_len tokens (a micro-batch)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size (4096 for Llama-8B; CPU time grows with it)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--distilled", type=float, default=1.0, help="share of the tokens KD covers (kd.rows general: ~0.15)"
    )
    p.add_argument("--child", nargs=2, metavar=("WAY", "KD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return_freed_memory_to_os()
        print(json.dumps(measure(args.child[0], args.child[1] == "1", args)))
        return
    results: dict[tuple[str, bool], dict[str, float]] = {}
    ways = {kd: [w for w in WAYS if w != "chunked, masked" or (kd and args.distilled < 1)] for kd in (False, True)}
    for kd in (False, True):
        for way in ways[kd]:
            child = [sys.executable, "-m", "bench.loss_memory", *sys.argv[1:], "--child", way, str(int(kd))]
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout
            results[way, kd] = json.loads(out.strip().splitlines()[-1])
    print(
        f"\nloss forward + backward, {args.rows}×{args.seq_len} tokens, hidden {args.hidden}, vocab {args.vocab}, "
        f"{args.dtype} on {args.device}; peak above the inputs (gradients included), median ± std of "
        f"{args.repeats} runs" + (f"; KD on the first {args.distilled:.0%} of the tokens" if args.distilled < 1 else "")
    )
    worst_peak = worst_time = 0.0
    cells = []
    for kd in (False, True):
        full = results["full logits", kd]
        for way in ways[kd]:
            r = results[way, kd]
            peak_ratio, time_ratio = r["peak"] / full["peak"], r["time"] / full["time"]
            cells.append(
                (
                    "CE + KD" if kd else "CE",
                    way,
                    f"{r['peak'] / 1e9:.2f}",
                    f"{peak_ratio:.3f}",
                    f"{r['time']:.2f} ± {r['spread']:.2f}",
                    f"{time_ratio:.2f}",
                )
            )
            if way == "chunked":
                worst_peak, worst_time = max(worst_peak, peak_ratio), max(worst_time, time_ratio)
    print(table(("loss", "way", "peak GB", "vs full", "time s", "vs full"), cells))
    results_by_name = {f"{way}{', KD' if kd else ''}": r for (way, kd), r in results.items()}
    finish("loss_memory", {"loss_peak_vs_naive": worst_peak, "loss_time_vs_naive": worst_time}, results_by_name)


if __name__ == "__main__":
    main()
