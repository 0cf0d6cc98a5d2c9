"""Replay in a step: the sampler's order and resume, and every replay strategy on a tiny Llama."""

from __future__ import annotations

import pytest
import torch

from cpt_core.errors import ConfigError, UserError
from pipeline.config import KDConfig, ReplayConfig, load_train_config
from pipeline.gere.cache import pad_replay_rows
from pipeline.gere.sampler import ReplaySampler
from pipeline.losses.head import HeadLoss, final_hidden, frozen_head_weight
from pipeline.losses.objective import Objective, ReplayOutputs, TaskOutputs
from pipeline.losses.replay import ReplayInputs, causal_ce, replay_terms
from pipeline.runtime.model import load_causal_lm

from .test_gere_cache import REPLAY_LEN, built, open_cache, replay  # noqa: F401  (module fixtures)


def test_every_pass_is_a_fresh_permutation_using_each_sample_once():
    s = ReplaySampler(num_samples=10, per_step=3, seed=4)
    drawn = [i for _ in range(10) for i in s.next_indices()]  # 30 = three passes
    passes = [drawn[k * 10 : (k + 1) * 10] for k in range(3)]
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert passes[0] != passes[1] != passes[2]


def test_sampler_resumes_the_same_sequence_from_its_state():
    a = ReplaySampler(13, 4, seed=1)
    for _ in range(5):
        a.next_indices()
    b = ReplaySampler(13, 4, seed=1)
    b.load_state_dict(a.state_dict())
    assert [a.next_indices() for _ in range(9)] == [b.next_indices() for _ in range(9)]
    with pytest.raises(UserError, match="seed"):
        ReplaySampler(13, 4, seed=2).load_state_dict(a.state_dict())


def step_inputs(built, index, teacher=None):
    source, _, rows, _, _ = built
    cache = open_cache(built)
    ids, mask = pad_replay_rows([rows["input_ids"][i] for i in index], REPLAY_LEN)
    inputs = ReplayInputs(
        ids, mask, cache.states(index), cache.thresholds.neg, cache.thresholds.pos, cache.features(index)
    )
    if teacher is not None:
        with torch.no_grad():
            inputs.teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits
    return inputs


def forward(model, inputs):
    out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


@pytest.mark.parametrize("strategy", ["kl", "l1", "l2", "tm"])
def test_each_strategy_is_near_zero_for_the_base_model_and_grows_when_weights_move(built, strategy):
    source = built[0]
    base = load_causal_lm(source).eval()
    model = load_causal_lm(source)
    inputs = step_inputs(built, [0, 3, 5, 7], teacher=base)
    cfg = ReplayConfig(strategy=strategy, fused_tm=False)
    before = replay_terms(cfg, *forward(model, inputs), inputs)[strategy].item()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = replay_terms(cfg, *forward(model, inputs), inputs)[strategy].item()
    if strategy in ("kl", "tm"):
        assert before == 0.0
    else:  # cached states are bf16: |h - bf16(h)| <= 2^-9 |h| per element
        f = inputs.features.float()[inputs.attention_mask.bool()]
        bound = 2**-9 * f.abs().mean() if strategy == "l1" else 2**-18 * (f * f).mean()
        assert before <= bound.item(), (before, bound)
    assert after > 100 * max(before, 1e-6)


def test_replay_ce_matches_the_models_own_loss_on_unpadded_rows(built):
    source, _, rows, _, _ = built
    model = load_causal_lm(source).eval()
    full = [i for i in range(len(rows)) if len(rows["input_ids"][i]) == REPLAY_LEN][:3]
    ids, mask = pad_replay_rows([rows["input_ids"][i] for i in full], REPLAY_LEN)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        ours = causal_ce(out.logits, ids, mask)
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-6)


def objective_inputs(vocab: int = 11, hidden: int = 6) -> tuple[TaskOutputs, ReplayOutputs]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    labels[0, :2] = -100  # no-loss prompt tokens
    task = TaskOutputs(torch.randn(2, 5, vocab, generator=g, requires_grad=True), labels)
    ids = torch.randint(0, vocab, (3, 4), generator=g)
    rep = ReplayOutputs(
        torch.randn(3, 4, vocab, generator=g, requires_grad=True),
        torch.randn(3, 4, hidden, generator=g, requires_grad=True),
        ReplayInputs(ids, torch.ones(3, 4, dtype=torch.long), features=torch.randn(3, 4, hidden, generator=g)),
    )
    return task, rep


def test_the_objective_is_the_loss_backward_sees_and_its_parts_add_up_to_it():
    task, rep = objective_inputs()
    global_tokens, scale, accum = 20, 4, 2  # this micro-batch holds 8 of the global batch's 20 loss tokens
    objective = Objective(ReplayConfig(strategy="l2", weight=0.5), KDConfig())
    part = objective(task, rep, global_tokens, scale, accum)
    ce_sum = torch.nn.functional.cross_entropy(
        task.logits[:, :-1].flatten(0, 1), task.labels[:, 1:].flatten(), reduction="sum"
    )
    replay_ce = causal_ce(rep.logits, rep.inputs.input_ids, rep.inputs.attention_mask)
    l2 = ((rep.hidden - rep.inputs.features) ** 2).mean()
    expected = ce_sum / global_tokens * scale + replay_ce + 0.5 * l2
    torch.testing.assert_close(part.loss, expected)
    assert part.logged == pytest.approx(
        {"task_ce": ce_sum.item(), "replay_ce": replay_ce.item() / accum, "l2": l2.item() / accum}
    )
    part.loss.backward()
    reference = [t.grad.clone() for t in (task.logits, rep.logits, rep.hidden)]
    for t in (task.logits, rep.logits, rep.hidden):
        t.grad = None
    expected.backward()
    for got, want in zip(reference, (task.logits.grad, rep.logits.grad, rep.hidden.grad)):
        torch.testing.assert_close(got, want)


def test_replay_ce_weight_scales_replay_ce_alone_in_the_loss_and_its_log():
    task, rep = objective_inputs()
    full = Objective(ReplayConfig(strategy="l2", weight=0.5), KDConfig())(task, rep, 20, 4, 2)
    off = Objective(ReplayConfig(strategy="l2", weight=0.5, ce_weight=0.0), KDConfig())
    part = off(task, rep, 20, 4, 2)
    replay_ce = causal_ce(rep.logits, rep.inputs.input_ids, rep.inputs.attention_mask)
    torch.testing.assert_close(part.loss, full.loss - replay_ce)
    assert part.logged == pytest.approx(full.logged)  # still measured and logged, not trained on
    logged = off.summarize(part.parts, 20, 1, torch.device("cpu"), part.replay_weight)
    assert logged["loss"] == pytest.approx(logged["loss/task_ce"] + 0.5 * logged["loss/l2"])


def test_dynamic_weight_scales_the_term_to_ce_and_passes_no_gradient_through_the_weight():
    task, rep = objective_inputs()
    part = Objective(ReplayConfig(strategy="l1", weight="dynamic"), KDConfig())(task, rep, 8, 1, 1)
    ce = part.logged["task_ce"] / 8 + part.logged["replay_ce"]
    assert part.replay_weight == pytest.approx(ce / part.logged["l1"])
    part.loss.backward()
    grad = rep.hidden.grad.clone()  # d(w · l1)/dh with w a constant: w · sign(h - f) / numel
    expected = part.replay_weight * torch.sign(rep.hidden - rep.inputs.features) / rep.hidden.numel()
    torch.testing.assert_close(grad, expected.detach())
    capped = Objective(ReplayConfig(strategy="l1", weight="dynamic", max_weight=0.5), KDConfig())(task, rep, 8, 1, 1)
    assert part.replay_weight > 0.5 and capped.replay_weight == 0.5  # a term near 0 cannot blow the step up
    fixed = Objective(ReplayConfig(strategy="l1", weight=100.0), KDConfig())(task, rep, 8, 1, 1)
    assert fixed.replay_weight == 100.0
    none = Objective(ReplayConfig(strategy="none"), KDConfig())(task, None, 8, 1, 1)
    assert none.loss.item() == pytest.approx(part.logged["task_ce"] / 8) and none.replay_weight == 0.0


@pytest.mark.parametrize("strategy", ["ce", "l2", "tm", "kl"])
def test_a_chunk_of_padding_rows_only_scores_zero_and_adds_nothing(strategy):
    """A rank with no sample this step (1 sample on 2 ranks) runs padding rows only, weighted 0: every term is
    a finite 0, so the micro-batch's loss is its task loss alone (a 0/0 there would make it NaN)."""
    from pipeline.gere.states import activation_states, pack_states

    task, rep = objective_inputs()
    inputs = rep.inputs
    inputs.neg, inputs.pos = torch.full((6,), -1.0), torch.full((6,), 1.0)
    inputs.states = pack_states(activation_states(inputs.features, inputs.neg, inputs.pos))
    inputs.teacher_logits = rep.logits.detach() + 0.1 * torch.randn_like(rep.logits)
    inputs.real = 0
    terms = replay_terms(ReplayConfig(strategy=strategy), rep.logits, rep.hidden, inputs)
    assert all(float(t) == 0.0 for t in terms.values()), terms
    objective = Objective(ReplayConfig(strategy=strategy, weight="dynamic"), KDConfig())
    padded = objective(task, ReplayOutputs(rep.logits, rep.hidden, inputs, share=0.0), 8, 2, 2)
    assert torch.equal(padded.loss, objective(task, None, 8, 2, 2).loss)


@pytest.mark.parametrize("weight, ce_weight, real", [(1.5, 0.0, None), ("dynamic", 1.0, None), (1.5, 1.0, 2)])
def test_replay_kl_through_the_head_loss_matches_the_full_logits_path_in_value_and_gradient(
    built, weight, ce_weight, real
):
    """The kl strategy from hidden states (no [R, L, V] logits, student's or teacher's) against the same
    objective on full logits, on padded replay rows of a tiny Llama, with the budget's scale and a share
    (``real``: the third row only fills the forward)."""
    source = built[0]
    base = load_causal_lm(source).eval()
    model = load_causal_lm(source)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = ReplayConfig(strategy="kl", weight=weight, ce_weight=ce_weight, kl_temperature=2.0)
    task, _ = objective_inputs()
    rows = built[2]["input_ids"]
    ids, mask = pad_replay_rows([rows[0][:23], rows[3], rows[5][:31]], REPLAY_LEN)  # two rows padded
    results = []
    for from_hidden in (False, True):
        inputs = ReplayInputs(ids, mask, real=real)
        if from_hidden:
            with torch.no_grad():
                inputs.teacher_hidden = final_hidden(base, input_ids=ids, attention_mask=mask)
            out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_hidden_states=True)
            assert out.logits.shape[1] == 1  # the student's head ran on one position
            rep = ReplayOutputs(None, out.hidden_states[-1], inputs, share=0.5)
            objective = Objective(cfg, KDConfig(), HeadLoss(model), frozen_head_weight(base))
        else:
            with torch.no_grad():
                inputs.teacher_logits = base(input_ids=ids, attention_mask=mask).logits
            rep = ReplayOutputs(*forward(model, inputs), inputs, share=0.5)
            objective = Objective(cfg, KDConfig())
        objective.anti_forgetting_scale = 2.0
        model.zero_grad()
        part = objective(task, rep, 20, 4, 2)
        part.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((part, grads))
    (full, full_grads), (chunked, chunked_grads) = results
    assert chunked.logged["kl"] > 1e-4  # the student moved: a term to compare
    assert chunked.logged == pytest.approx(full.logged, rel=1e-5)
    assert chunked.replay_weight == pytest.approx(full.replay_weight, rel=1e-5)
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kd_counts_only_loss_tokens_of_the_distilled_rows():
    task, _ = objective_inputs()
    task.teacher_logits = task.logits.detach() + torch.randn_like(task.logits)
    kd = Objective(ReplayConfig(), KDConfig(weight=1.0, temperature=2.0))
    both = kd(task, None, 8, 1, 1).parts["kd"]
    task.distilled_rows = torch.tensor([False, True])
    second = kd(task, None, 8, 1, 1).parts["kd"]
    task.distilled_rows = torch.tensor([True, False])
    first = kd(task, None, 8, 1, 1).parts["kd"]
    assert 0 < first < both and 0 < second < both and first + second == pytest.approx(both)
    # No row distilled on any rank: the teacher did not run, and the loss is task CE alone, with KD logged as 0
    task.teacher_logits, task.distilled_rows = None, torch.tensor([False, False])
    none = kd(task, None, 8, 1, 1)
    plain = Objective(ReplayConfig(), KDConfig())(task, None, 8, 1, 1)
    assert none.parts["kd"] == 0.0 and none.loss.item() == plain.loss.item()


@pytest.mark.parametrize(
    "bad, message",
    [
        ("replay.strategy=mse", "replay.strategy must be none | ce | kl | l1 | l2 | tm"),
        ("replay.weight=auto", "replay.weight must be a number or dynamic"),
        ("replay.weight=-1", "replay.weight must be >= 0"),
        ("replay.kl_temperature=0", "replay.kl_temperature must be > 0"),
    ],
)
def test_bad_replay_config_is_a_clear_error(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, ["data.prep=p", "steps=5", "model.config={hidden_size: 8}", bad])


def test_replay_slots_give_every_rank_and_micro_batch_an_equal_disjoint_share():
    from pipeline.gere.sampler import replay_slots

    drawn = list(range(100, 124))
    slots = [replay_slots(drawn, world=3, grad_accum=2, rank=r) for r in range(3)]
    flat = [i for rank in slots for chunk in rank for i in chunk.rows]
    assert sorted(flat) == drawn and all(chunk.rows and chunk.real == 4 for rank in slots for chunk in rank)
    assert slots[1][0].rows == drawn[4:8] and slots[0][1].rows == drawn[12:16]  # micro-batch j, rank r: j·world + r


def test_fewer_replay_samples_than_slots_go_to_the_same_micro_batches_on_every_rank():
    from pipeline.gere.sampler import replay_plan, replay_slots

    drawn = list(range(6))  # 3 ranks × 4 micro-batches = 12 slots, 6 samples: 2 micro-batches with replay
    slots = [replay_slots(drawn, world=3, grad_accum=4, rank=r) for r in range(3)]
    active = [[j for j, chunk in enumerate(rank) if chunk is not None] for rank in slots]
    assert active == [[0, 2]] * 3  # spread over the step, the same on every rank (ZeRO-3 forwards are collective)
    assert sorted(i for rank in slots for chunk in rank if chunk for i in chunk.rows) == drawn
    assert replay_plan(6, 3, 4) == (1, 2) and replay_plan(24, 3, 4) == (2, 4)


@pytest.mark.parametrize("samples", [1, 2, 3, 5, 7, 10, 30, 64, 65])
@pytest.mark.parametrize("world,grad_accum", [(2, 1), (3, 4), (8, 2), (128, 1)])
def test_any_sample_count_runs_on_any_number_of_ranks_with_each_sample_weighed_once(samples, world, grad_accum):
    """Every rank runs forwards of one shape in the same micro-batches; the real rows are the drawn samples
    exactly once; a chunk's weight is proportional to its real rows and the weights add up to the mean."""
    from pipeline.gere.sampler import replay_plan, replay_slots

    drawn = list(range(1000, 1000 + samples))
    rows, active = replay_plan(samples, world, grad_accum)
    slots = [replay_slots(drawn, world, grad_accum, rank) for rank in range(world)]
    on = {tuple(j for j, chunk in enumerate(rank) if chunk is not None) for rank in slots}
    assert len(on) == 1 and len(next(iter(on))) == active <= grad_accum
    chunks = [chunk for rank in slots for chunk in rank if chunk is not None]
    assert {len(chunk.rows) for chunk in chunks} == {rows}
    assert sorted(i for chunk in chunks for i in chunk.rows[: chunk.real]) == drawn
    assert all(set(chunk.rows[chunk.real :]) <= {drawn[0]} for chunk in chunks)  # padding: a real sample's copy
    shares = [chunk.share for chunk in chunks]
    # DeepSpeed divides the summed gradient by grad_accum × world: the chunk weights then add up to one
    assert sum(shares) / (grad_accum * world) == pytest.approx(1.0)
    assert all(
        share == pytest.approx(grad_accum * world / samples * chunk.real) for share, chunk in zip(shares, chunks)
    )
    if samples == world * active * rows:  # every chunk full: the weight replay had before any padding, bit for bit
        assert all(share == grad_accum / active for share in shares)


@pytest.mark.parametrize("strategy", ["ce", "l2", "tm", "kl"])
def test_padding_rows_change_no_replay_term(strategy):
    """A chunk of two real rows padded with a third scores what the two real rows score alone."""
    from pipeline.gere.states import activation_states, pack_states

    _, rep = objective_inputs()
    full = rep.inputs
    full.neg, full.pos = torch.full((6,), -1.0), torch.full((6,), 1.0)
    full.states = pack_states(activation_states(full.features, full.neg, full.pos))
    full.teacher_logits = rep.logits.detach() + 0.1 * torch.randn_like(rep.logits)
    padded = ReplayInputs(**{**vars(full), "real": 2})
    alone = ReplayInputs(
        **{k: (v[:2] if isinstance(v, torch.Tensor) and v.shape[0] == 3 else v) for k, v in vars(full).items()}
    )
    cfg = ReplayConfig(strategy=strategy)
    with_padding = replay_terms(cfg, rep.logits, rep.hidden, padded)
    without = replay_terms(cfg, rep.logits[:2], rep.hidden[:2], alone)
    assert with_padding.keys() == without.keys() == {"replay_ce", strategy} - {"ce"}
    for name in without:
        torch.testing.assert_close(with_padding[name], without[name])
    assert replay_terms(cfg, rep.logits, rep.hidden, full)["replay_ce"] != without["replay_ce"]  # the third row counts


def test_replay_on_some_micro_batches_gives_the_mean_over_the_steps_samples():
    """Two micro-batches, one with replay: its replay term counts twice, as if split over both."""
    task, rep = objective_inputs()
    objective = Objective(ReplayConfig(strategy="ce"), KDConfig())
    half = objective(task, ReplayOutputs(rep.logits, rep.hidden, rep.inputs, share=2.0), 8, 2, 2)
    none = objective(task, None, 8, 2, 2)
    replay_ce = causal_ce(rep.logits, rep.inputs.input_ids, rep.inputs.attention_mask)
    torch.testing.assert_close(half.loss - none.loss, 2.0 * replay_ce)  # DeepSpeed then divides by grad_accum = 2
    assert half.parts["replay_ce"] == pytest.approx(replay_ce.item())  # logged: the step's mean


@pytest.mark.parametrize("budget_scale", [1.0, 3.0])
def test_the_logged_loss_is_the_objective_with_the_weight_used(budget_scale):
    """With the forgetting budget's scale too: the logged loss is the one optimized."""
    task, rep = objective_inputs()
    objective = Objective(ReplayConfig(strategy="l2", weight="dynamic", ce_weight=0.5), KDConfig())
    objective.anti_forgetting_scale = budget_scale
    parts = [objective(task, rep, 16, 2, 2) for _ in range(2)]  # two micro-batches of one step, one rank
    sums = {name: sum(p.parts[name] for p in parts) for name in parts[0].parts}
    out = objective.summarize(sums, 16, world=1, device=torch.device("cpu"), replay_weight=parts[-1].replay_weight)
    assert out["loss/task_ce"] == pytest.approx(sums["task_ce"] / 16)
    assert out["loss/replay_ce"] == pytest.approx(sums["replay_ce"]) and out["loss/l2"] == pytest.approx(sums["l2"])
    replay_ce = 0.5 * budget_scale * out["loss/replay_ce"]
    expected = out["loss/task_ce"] + replay_ce + parts[-1].replay_weight * out["loss/l2"]
    assert out["loss"] == pytest.approx(expected) and out["replay_weight"] == parts[-1].replay_weight
    # the loss backward sees, summed over the step's micro-batches and divided by DeepSpeed's factor (2), is it too
    assert sum(p.loss.item() for p in parts) / 2 == pytest.approx(out["loss"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["none", "ce", "l2", "tm"])
def test_a_micro_batch_reads_nothing_back_from_the_device_and_a_step_reads_its_parts_once(strategy, monkeypatch):
    """On a GPU each read of a device tensor into Python waits for the GPU and stalls ZeRO-3's prefetch; counted
    here on CPU by wrapping every Tensor-to-Python conversion, so a new one in the objective fails this test."""
    task, rep = objective_inputs()
    from pipeline.gere.states import activation_states, pack_states

    neg, pos = torch.full((6,), -1.0), torch.full((6,), 1.0)
    inputs = ReplayInputs(rep.inputs.input_ids, rep.inputs.attention_mask, features=rep.inputs.features)
    inputs.states, inputs.neg, inputs.pos = pack_states(activation_states(rep.inputs.features, neg, pos)), neg, pos
    replay = None if strategy == "none" else ReplayOutputs(rep.logits, rep.hidden, inputs)
    objective = Objective(ReplayConfig(strategy=strategy, weight=0.5), KDConfig())
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _n=name, _o=original: reads.append(_n) or _o(t, *a))
    sums: dict = {}
    for _ in range(2):  # two micro-batches of one step
        part = objective(task, replay, 20, 1.0, 2)
        for k, v in part.parts.items():
            sums[k] = sums.get(k, 0.0) + v
    assert reads == []
    objective.summarize(sums, 20, 1, torch.device("cpu"), part.replay_weight)
    assert reads == ["tolist"]


def test_replay_kl_through_the_head_reads_nothing_back_per_micro_batch(built, monkeypatch):
    """The default method's path (kl from hidden states): its token counts come from the rows on the host, as the
    feed reads them before the rows move to the device, so a micro-batch converts no tensor to Python."""
    source = built[0]
    base, model = load_causal_lm(source).eval(), load_causal_lm(source)
    ids, mask = pad_replay_rows([row[:20] for row in built[2]["input_ids"][:2]], REPLAY_LEN)
    inputs = ReplayInputs(ids, mask, real=1)
    inputs.token_counts()  # as ReplayFeed.inputs does, on the host
    with torch.no_grad():
        inputs.teacher_hidden = final_hidden(base, input_ids=ids, attention_mask=mask)
    hidden = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
    objective = Objective(
        ReplayConfig(strategy="kl", weight=3.0), KDConfig(), HeadLoss(model), frozen_head_weight(base)
    )
    task, _ = objective_inputs()
    reads: list[str] = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _n=name, _o=original: reads.append(_n) or _o(t, *a))
    part = objective(task, ReplayOutputs(None, hidden, inputs), 20, 1.0, 2)
    part.loss.backward()
    assert reads == [] and part.parts["kl"] >= 0 and part.parts["replay_ce"] > 0
