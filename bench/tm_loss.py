"""TM loss cost: PyTorch reference vs torch.compile'd reference (CPU), and the fused kernel (GPU).

Each variant runs forward + backward (what a training step pays) on the same
inputs, built as in training: reference activations → thresholds → packed
2-bit states, and the current h a perturbed copy. Reported per variant: median
time over --iters runs after warm-up, and the peak memory above the inputs
(CPU: VmHWM after resetting it through /proc/self/clear_refs; GPU:
torch.cuda.max_memory_allocated). On a GPU the fused kernel's achieved
bandwidth (bytes it must move / time) is compared with a device-to-device copy
measured in the same process. Also: GeRe cache size for 1000 x 563 tokens.

    python -m bench.tm_loss                      # CPU: B=4 L=512 H=4096
    python -m bench.tm_loss --device cuda --batch 2 --length 4096 --hidden 4096
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.harness import finish, repeat, table
from pipeline.gere.states import activation_states, pack_states, packed_width
from pipeline.losses.tm_loss import TMLossFunction, tm_loss_reference


def make_inputs(b: int, length: int, h: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(b, length, h, generator=g)
    mean, std = ref.mean((0, 1)), ref.std((0, 1))
    packed = pack_states(activation_states(ref, mean - std, mean + std))
    x = (ref + 0.3 * torch.randn(ref.shape, generator=g)).to(dtype)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[:, -length // 8 :] = 0  # some padding, as replay rows have
    return [t.to(device) for t in (x, packed, mean - std, mean + std, mask)]


def step(fn: Callable, x, packed, neg, pos, mask) -> None:
    h = x.detach().requires_grad_(True)
    loss = fn(h, packed, neg, pos, mask)[0]
    loss.backward()


def vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def vmrss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def measure(fn: Callable, inputs, iters: int, device: str) -> tuple[float, float]:
    """(median seconds, peak MB above the inputs) of forward + backward."""
    times = repeat(lambda: step(fn, *inputs), iters, warmup=2)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, *inputs)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = vmrss_mb()
        step(fn, *inputs)
        peak = vmhwm_mb() - base
    return times.median, peak


def copy_bandwidth(nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    copies = repeat(lambda: dst.copy_(src), 20, warmup=3)
    return 2 * nbytes / copies.median  # read + write


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.batch, args.length, args.hidden, dtype, args.device)
    variants: dict[str, Callable] = {
        "reference": tm_loss_reference,
        "compiled reference": torch.compile(tm_loss_reference),
    }
    if args.device == "cuda":
        variants["fused (Triton)"] = TMLossFunction.apply
    results = {name: measure(fn, inputs, args.iters, args.device) for name, fn in variants.items()}
    ref_s, ref_mb = results["reference"]
    print(
        f"\nTM loss forward+backward, B={args.batch} L={args.length} H={args.hidden} {args.dtype} on {args.device}, "
        f"median of {args.iters}"
    )
    cells = [(name, f"{s * 1e3:.2f}", f"{ref_s / s:.2f}x", f"{mb:.1f}") for name, (s, mb) in results.items()]
    print(table(("variant", "ms", "vs reference", "peak extra MB"), cells))
    figures: dict[str, float] = {"compiled_vs_reference": ref_s / results["compiled reference"][0]}
    if "fused (Triton)" in results:
        fused_s, fused_mb = results["fused (Triton)"]
        elems = args.batch * args.length * args.hidden
        moved = (
            2 * (elems * inputs[0].element_size() + args.batch * args.length * packed_width(args.hidden))
            + elems * inputs[0].element_size()
        )  # forward reads h + states; backward reads both again, writes dL/dh
        bw = moved / fused_s
        peak_bw = copy_bandwidth(1 << 30)
        print(f"fused: {bw / 1e9:.0f} GB/s achieved vs {peak_bw / 1e9:.0f} GB/s device copy = {bw / peak_bw:.2f}")
        figures["fused_speedup"] = ref_s / fused_s
        figures["fused_memory_ratio"] = ref_mb / max(fused_mb, 1e-3)
        figures["fused_bandwidth_fraction"] = bw / peak_bw
    n, length, h = 1000, 563, 4096
    ours, fp32 = n * length * packed_width(h), n * length * h * 4
    print(
        f"GeRe cache for {n} samples x {length} tokens at H={h}: 2-bit states {ours / 2**20:.0f} MB "
        f"vs fp32 activations {fp32 / 2**20:.0f} MB ({fp32 / ours:.0f}x smaller)"
    )
    figures["cache_ratio_vs_fp32"] = fp32 / ours
    finish("tm_loss", figures, {name: {"seconds": s, "peak_mb": mb} for name, (s, mb) in results.items()})


if __name__ == "__main__":
    main()
