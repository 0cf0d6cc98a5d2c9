"""The chunked head loss equals the full-logits computation, in value and gradient, alone and inside a model."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from pipeline.config import KDConfig, ReplayConfig, TrainConfig
from pipeline.losses.head import attach_head_loss, chunkable_head, loss_from_hidden
from pipeline.losses.linear_ce import TeacherHead, linear_ce_kl, linear_ce_kl_reference
from pipeline.losses.objective import Objective, ReplayOutputs, TaskOutputs
from pipeline.losses.replay import ReplayInputs, kl_from_hidden
from pipeline.runtime.model import ModelSource, load_causal_lm

from .train_helpers import KERNEL_TEST_DEVICE as DEVICE
from .train_helpers import TINY_LLAMA

N, H, V = 45, 24, 131


def problem(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TeacherHead]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.4).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    targets[::4] = -100
    teacher = TeacherHead(
        torch.randn(N, 16, generator=g).to(DEVICE, dtype),
        (torch.randn(V, 16, generator=g) * 0.4).to(DEVICE, dtype),
        (torch.rand(N, generator=g) > 0.3).to(DEVICE),
        temperature=2.0,
    )
    return hidden, weight, targets, teacher


def value_and_grads(fn, hidden, weight, upstream=0.7):
    loss, ce, kl = fn()
    assert not ce.requires_grad and not kl.requires_grad
    (upstream * loss).backward()
    out = [loss.detach(), ce, kl, hidden.grad.clone(), weight.grad.clone()]
    hidden.grad = weight.grad = None
    return out


@pytest.mark.parametrize("chunk", [1, 7, N, 1000])
@pytest.mark.parametrize("distill", [False, True])
def test_chunked_equals_full_logits_in_value_and_gradient_fp32(chunk, distill):
    hidden, weight, targets, teacher = problem(torch.float32)
    teacher = teacher if distill else None
    ours = value_and_grads(lambda: linear_ce_kl(hidden, weight, targets, teacher, 1.3, chunk), hidden, weight)
    ref = value_and_grads(lambda: linear_ce_kl_reference(hidden, weight, targets, teacher, 1.3), hidden, weight)
    for name, a, b in zip(("loss", "ce", "kl", "grad_hidden", "grad_weight"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert (ours[2] > 0) == distill


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("m", [0, 10, N])
def test_a_teacher_on_the_first_m_tokens_equals_one_on_every_token_masked_past_them(chunk, m):
    """KD on some rows gives the head loss the teacher on a prefix of the tokens only (no teacher GEMM for the
    rest): the same value and gradients as a teacher on every token whose mask ends at m."""
    hidden, weight, targets, teacher = problem(torch.float32, seed=5)
    prefix = TeacherHead(teacher.hidden[:m], teacher.weight, teacher.mask[:m], teacher.temperature)
    masked = TeacherHead(
        teacher.hidden, teacher.weight, teacher.mask & (torch.arange(N, device=DEVICE) < m), teacher.temperature
    )
    ours = value_and_grads(lambda: linear_ce_kl(hidden, weight, targets, prefix, 1.3, chunk), hidden, weight)
    for reference in (prefix, masked):
        ref = value_and_grads(lambda: linear_ce_kl_reference(hidden, weight, targets, reference, 1.3), hidden, weight)
        for name, a, b in zip(("loss", "ce", "kl", "grad_hidden", "grad_weight"), ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda msg: f"{name}: {msg}")
    assert (ours[2] > 0) == (m > 0)


def test_a_teacher_longer_than_the_tokens_or_its_mask_is_refused():
    hidden, weight, targets, teacher = problem(torch.float32, seed=6)
    longer = TeacherHead(torch.cat([teacher.hidden, teacher.hidden[:1]]), teacher.weight, torch.ones(N + 1, dtype=bool))
    short_mask = TeacherHead(teacher.hidden[:10], teacher.weight, teacher.mask[:9])
    for bad in (longer, short_mask):
        with pytest.raises(ValueError, match="a teacher on"):
            linear_ce_kl(hidden, weight, targets, bad, 1.0, 8)


@pytest.mark.parametrize("kl_weight, ce_weight", [(0.0, 1.0), (2.5, 1.0), (-0.5, 1.0), (1.5, 0.0), (0.7, 0.3)])
def test_the_weights_are_the_ratio_of_the_two_gradients(kl_weight, ce_weight):
    """ce_weight 0: KL alone, as the kl replay strategy trains with replay.ce_weight 0."""
    hidden, weight, targets, teacher = problem(torch.float32, seed=1)
    ours = value_and_grads(
        lambda: linear_ce_kl(hidden, weight, targets, teacher, kl_weight, 8, ce_weight), hidden, weight, 2.0
    )
    ref = value_and_grads(
        lambda: linear_ce_kl_reference(hidden, weight, targets, teacher, kl_weight, ce_weight), hidden, weight, 2.0
    )
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 0.03), (torch.bfloat16, 0.15)])
def test_replay_kl_from_hidden_keeps_its_gradient_in_half_precision(dtype, bound):
    """Replay KL's per-token weights are ~1/tokens. Formed in the head's forward in fp16 they would underflow
    (fp16's loss scale comes in backward), so they reach the gradient through backward: fp16 and bf16
    gradients against fp32, 1024 replay tokens, an fp16-style loss scale."""
    g = torch.Generator().manual_seed(0)
    rows, length, h, v = 8, 128, 64, 4096
    ids = torch.randint(0, v, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, 100:] = 0
    hidden, weight = torch.randn(rows, length, h, generator=g), torch.randn(v, h, generator=g) * 0.1
    teacher_hidden = hidden + 0.1 * torch.randn(hidden.shape, generator=g)

    def grads(dt: torch.dtype) -> list[torch.Tensor]:
        student, head_weight = hidden.to(dt).requires_grad_(), weight.to(dt).requires_grad_()

        def head(x, targets, teacher=None, kl_weight=1.0, ce_weight=1.0):
            return linear_ce_kl(x, head_weight, targets, teacher, kl_weight, ce_weight=ce_weight)

        inputs = ReplayInputs(ids, mask, teacher_hidden=teacher_hidden.to(dt))
        both, _, _ = kl_from_hidden(head, student, inputs, weight.to(dt), 1.0, 0.0, 1.5)
        (both * 1024.0).backward()
        return [student.grad.float() / 1024.0, head_weight.grad.float() / 1024.0]

    for got, want in zip(grads(dtype), grads(torch.float32)):
        assert ((got - want).norm() / want.norm()).item() < bound


def test_without_autograd_only_the_sums_are_computed():
    hidden, weight, targets, teacher = problem(torch.float32, seed=4)
    with torch.no_grad():
        loss, ce, kl = linear_ce_kl(hidden, weight, targets, teacher, 0.5, 8)
    ref = linear_ce_kl_reference(hidden, weight, targets, teacher, 0.5)
    torch.testing.assert_close(torch.stack([loss, ce, kl]), torch.stack(ref).detach(), rtol=1e-5, atol=1e-6)
    assert not loss.requires_grad


def test_bf16_matches_the_bf16_full_logits_path():
    """bf16 GEMMs round the logits as lm_head does; the gradient differs by bf16 rounding of per-chunk sums."""
    hidden, weight, targets, teacher = problem(torch.bfloat16, seed=2)
    ours = value_and_grads(lambda: linear_ce_kl(hidden, weight, targets, teacher, 1.0, 8), hidden, weight)
    ref = value_and_grads(lambda: linear_ce_kl_reference(hidden, weight, targets, teacher), hidden, weight)
    assert ours[3].dtype == ours[4].dtype == torch.bfloat16
    for a, b in zip(ours, ref):
        scale = b.float().abs().max()
        assert float((a.float() - b.float()).abs().max() / scale) < 2e-2


def test_all_targets_ignored_gives_zero_and_zero_gradient():
    hidden, weight, targets, _ = problem(torch.float32)
    loss, ce, kl = linear_ce_kl(hidden, weight, torch.full_like(targets, -100), None, 1.0, 5)
    loss.backward()
    assert loss.item() == ce.item() == kl.item() == 0.0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    return load_causal_lm(ModelSource(config=TINY_LLAMA, seed=seed))


def test_objective_from_hidden_states_equals_the_objective_from_logits():
    """Task CE + KD on general rows + replay CE + TM's CE weight: one step's loss and every gradient, both ways."""
    student, teacher = tiny_llama(0), tiny_llama(1).eval()
    assert attach_head_loss(student, TrainConfig())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 20), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    replay_ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=g)
    replay_mask = torch.ones_like(replay_ids)
    replay_mask[1, 8:] = 0
    replay_cfg, kd = ReplayConfig(strategy="ce"), KDConfig(weight=0.5, temperature=2.0)
    rows = torch.tensor([True, False])
    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_hidden_states=True)

    def step(from_hidden: bool) -> tuple[float, dict[str, torch.Tensor]]:
        keep = {"logits_to_keep": 1} if from_hidden else {}
        out = student(input_ids=ids, output_hidden_states=True, **keep)
        rep = student(input_ids=replay_ids, attention_mask=replay_mask, output_hidden_states=True, **keep)
        if from_hidden:
            task = TaskOutputs(None, labels, hidden=out.hidden_states[-1], teacher_hidden=t_out.hidden_states[-1])
            objective = Objective(replay_cfg, kd, student.head_loss, teacher.lm_head.weight.detach())
        else:
            task = TaskOutputs(out.logits, labels, teacher_logits=t_out.logits)
            objective = Objective(replay_cfg, kd)
        task.distilled_rows = rows
        replay = ReplayOutputs(
            None if from_hidden else rep.logits, rep.hidden_states[-1], ReplayInputs(replay_ids, replay_mask)
        )
        part = objective(task, replay, global_tokens=30, scale=2, grad_accum=1)
        part.loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        student.zero_grad()
        return part.loss.item(), {**grads, **{k: torch.tensor(v) for k, v in part.logged.items()}}

    loss_h, grads_h = step(True)
    loss_l, grads_l = step(False)
    assert loss_h == pytest.approx(loss_l, rel=1e-6)
    assert grads_h.keys() == grads_l.keys() and {"kd", "replay_ce"} <= grads_h.keys()
    for name in grads_l:
        # The KL sum (0.28 here) is a difference of near-equal terms: fp32 GEMM rounding shows at ~2e-5 of it.
        rtol = 1e-4 if name == "kd" else 1e-5
        # atol scaled by the tensor's largest entry: an entry near 0 is a sum of terms of the tensor's size, so its
        # rounding is too (an AVX-512/AMX Xeon put 1.6e-7 on one embedding entry of 2.6e-3; the largest is 0.28).
        atol = 1e-5 * float(grads_l[name].abs().max()) if grads_l[name].ndim else 1e-7
        torch.testing.assert_close(grads_h[name], grads_l[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("from_hidden", [True, False])
@pytest.mark.parametrize("distilled, ran", [([False, True, True], [1, 2]), ([False, False, False], [0])])
def test_a_teacher_run_on_the_distilled_rows_only_gives_the_step_of_one_run_on_every_row(from_hidden, distilled, ran):
    """kd.rows general: the trainer hands the objective the teacher's outputs on the rows it ran on (a rank's
    first row when it has no general row, run for ZeRO-3's collectives only); same loss, parts and gradients as
    the teacher on every row with the others masked out."""
    student, teacher = tiny_llama(0), tiny_llama(1).eval()
    assert attach_head_loss(student, TrainConfig())
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (3, 16), generator=g)
    labels = ids.clone()
    labels[1, :6] = labels[2, 9:] = -100
    kd = KDConfig(weight=0.7, temperature=2.0, rows="general")
    with torch.no_grad():
        t_out = teacher(input_ids=ids, output_hidden_states=True)
    rows = torch.tensor(ran)

    def step(compact: bool) -> dict[str, torch.Tensor]:
        keep = {"logits_to_keep": 1} if from_hidden else {}
        out = student(input_ids=ids, output_hidden_states=True, **keep)
        t_hidden, t_logits = t_out.hidden_states[-1], t_out.logits
        if compact:
            t_hidden, t_logits = t_hidden[rows], t_logits[rows]
        if from_hidden:
            task = TaskOutputs(None, labels, hidden=out.hidden_states[-1], teacher_hidden=t_hidden)
            objective = Objective(ReplayConfig(), kd, student.head_loss, teacher.lm_head.weight.detach())
        else:
            task = TaskOutputs(out.logits, labels, teacher_logits=t_logits)
            objective = Objective(ReplayConfig(), kd)
        task.distilled_rows, task.teacher_rows = torch.tensor(distilled), rows if compact else None
        part = objective(task, None, global_tokens=30, scale=2, grad_accum=1)
        part.loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        student.zero_grad()
        return {"loss": part.loss.detach(), **grads, **{k: torch.tensor(v) for k, v in part.logged.items()}}

    full, compact = step(False), step(True)
    assert full.keys() == compact.keys() and (full["kd"] > 0) == any(distilled)
    for name in full:
        torch.testing.assert_close(compact[name], full[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_models_whose_logits_are_not_the_plain_head_keep_full_logits():
    gemma2 = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            final_logit_softcapping=30.0,
        )
    )
    assert "final_logit_softcapping=30.0" in chunkable_head(gemma2)
    assert not attach_head_loss(gemma2, TrainConfig()) and not hasattr(gemma2, "head_loss")
    llama, off = tiny_llama(), TrainConfig()
    off.model.chunked_loss = False
    assert not loss_from_hidden(off, llama) and not attach_head_loss(llama, off) and not hasattr(llama, "head_loss")
    assert chunkable_head(llama) is None and attach_head_loss(llama, TrainConfig())
    assert llama.state_dict().keys() == tiny_llama().state_dict().keys()  # nothing new to save or export
