"""TM loss: the fused Triton kernel against the PyTorch reference (TRITON_INTERPRET=1 on CPU).

Shapes include H not a multiple of the block or of 4, fully masked rows and
all-neutral inputs; value and gradient are compared per dtype.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.gere.states import NEUTRAL, activation_states, pack_states, unpack_states
from pipeline.losses.tm_loss import BLOCK_T, TMLossFunction, tm_loss_reference

from .train_helpers import KERNEL_TEST_DEVICE as DEVICE

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (set by tests/conftest.py) or CUDA",
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def make_case(batch: int, length: int, hidden: int, dtype: torch.dtype, seed: int, drift: float = 0.3):
    """Reference activations → thresholds and states; the current h is a perturbed copy."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(batch, length, hidden, generator=g) * (1 + torch.rand(hidden, generator=g))
    mean, std = ref.mean((0, 1)), ref.std((0, 1))
    neg, pos = mean - std, mean + std
    packed = pack_states(activation_states(ref, neg, pos))
    h = (ref + drift * torch.randn(ref.shape, generator=g)).to(dtype)
    mask = (torch.rand(batch, length, generator=g) > 0.2).to(torch.int64)
    return tuple(t.to(DEVICE) for t in (h, packed, neg, pos, mask))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 64), (1, 5, 37), (3, 7, 1030), (2, 3, 6)])
def test_fused_matches_reference_in_value_and_gradient(shape, dtype):
    h, packed, neg, pos, mask = make_case(*shape, dtype=dtype, seed=sum(shape))
    h_ref = h.clone().requires_grad_(True)
    h_fused = h.clone().requires_grad_(True)
    loss_ref, count_ref = tm_loss_reference(h_ref, packed, neg, pos, mask)
    loss_fused, count_fused = TMLossFunction.apply(h_fused, packed, neg, pos, mask)
    (3.0 * loss_ref).backward()
    (3.0 * loss_fused).backward()
    assert int(count_fused) == int(count_ref) > 0
    assert relative_error(loss_fused, loss_ref) < TOLERANCE[dtype]
    assert h_fused.grad.dtype == dtype
    assert relative_error(h_fused.grad, h_ref.grad) < TOLERANCE[dtype]


def test_fully_masked_rows_get_no_loss_and_zero_gradient():
    h, packed, neg, pos, mask = make_case(2, 6, 40, torch.float32, seed=3)
    mask[0] = 0
    h.requires_grad_(True)
    loss, count = TMLossFunction.apply(h, packed, neg, pos, mask)
    loss.backward()
    assert torch.all(h.grad[0] == 0) and h.grad[1].abs().sum() > 0
    ref_loss, ref_count = tm_loss_reference(h.detach(), packed, neg, pos, mask)
    assert int(count) == int(ref_count) and relative_error(loss, ref_loss) < 1e-5


def test_all_neutral_inside_thresholds_is_exactly_zero_with_zero_gradient():
    hidden = 50
    neg, pos = -torch.ones(hidden, device=DEVICE), torch.ones(hidden, device=DEVICE)
    h = (torch.rand(2, 4, hidden, device=DEVICE) * 1.8 - 0.9).requires_grad_(True)
    packed = pack_states(torch.full((2, 4, hidden), NEUTRAL, dtype=torch.uint8, device=DEVICE))
    loss, count = TMLossFunction.apply(h, packed, neg, pos, torch.ones(2, 4, dtype=torch.long, device=DEVICE))
    loss.backward()
    assert loss.item() == 0.0 and int(count) == 0 and torch.all(h.grad == 0)


def test_unchanged_activations_give_exactly_zero():
    h, packed, neg, pos, mask = make_case(2, 5, 70, torch.float32, seed=9, drift=0.0)
    loss, count = TMLossFunction.apply(h.requires_grad_(True), packed, neg, pos, mask)
    assert loss.item() == 0.0 and int(count) == 0


@pytest.mark.parametrize("hidden", [1, 3, 4, 5, 64, 129])
def test_packed_states_round_trip_and_are_16x_smaller_than_fp32(hidden):
    states = torch.randint(0, 3, (3, 7, hidden), dtype=torch.uint8)
    packed = pack_states(states)
    assert packed.shape == (3, 7, (hidden + 3) // 4)
    assert torch.equal(unpack_states(packed, hidden), states)
    if hidden % 4 == 0:
        assert states.numel() * 4 == packed.numel() * 16


def test_bad_shapes_are_refused_with_the_shapes_in_the_message():
    h, packed, neg, pos, mask = make_case(1, 4, 16, torch.float32, seed=1)
    with pytest.raises(ValueError, match="do not match"):
        TMLossFunction.apply(h, packed[..., :2], neg, pos, mask)


SM90_COMPILE = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pipeline.losses.tm_loss import BLOCK_T, _tm_backward_kernel, _tm_forward_kernel

pointers = {"h_ptr": "*bf16", "packed_ptr": "*u8", "neg_ptr": "*fp32", "pos_ptr": "*fp32", "mask_ptr": "*u8",
            "part_sum_ptr": "*fp32", "part_count_ptr": "*i32", "scale_ptr": "*fp32", "grad_ptr": "*bf16"}
out = {}
for name, kernel in (("forward", _tm_forward_kernel), ("backward", _tm_backward_kernel)):
    signature = {arg: "constexpr" if arg.startswith("BLOCK_") else pointers.get(arg, "i32") for arg in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={"BLOCK_T": BLOCK_T, "BLOCK_H": 1024})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
    out[name] = compiled.asm["ttir"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sm90_ttir() -> dict[str, str]:
    """TTIR of both kernels compiled ahead of time for an H100 (sm_90, bf16 h); no GPU needed.

    A subprocess because the code generator cannot run in a process where TRITON_INTERPRET=1 built triton.language.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set only to silence Triton's notice
    done = subprocess.run(
        [sys.executable, "-c", SM90_COMPILE],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("kernel, row_strided", [("forward", 2), ("backward", 3)])
def test_kernels_compile_for_sm90_with_int64_row_offsets(sm90_ttir, kernel, row_strided):
    """Each rows * stride product is i64, so offsets past 2^31 elements do not wrap.

    The overflow itself needs >= 2^31 elements (256k tokens x 8192 hidden: 4 GiB of bf16), too big to run
    here, so the check is on the compiled IR. Integer arguments are compiled as i32, as Triton types
    n_tokens and strides below 2^31: the case where i32 row offsets would wrap while every argument fits.
    """
    widths = re.findall(rf"arith\.muli [^:]*: tensor<{BLOCK_T}x1xi(\d+)>", sm90_ttir[kernel])
    # one rows[:, None] * stride per row-strided tensor: h and packed, and grad in the backward pass
    assert widths == ["64"] * row_strided, f"row offset products are i{widths}, expected {row_strided} x i64"
