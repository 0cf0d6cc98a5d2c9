"""Replay in a step: the sampler's order and resume, and every replay strategy on a tiny Llama."""
from __future__ import annotations

import pytest
import torch

from pipeline.gere.cache import pad_replay_rows
from pipeline.gere.sampler import ReplaySampler
from pipeline.losses.replay import ReplayInputs, ReplayLossConfig, causal_ce, combine, replay_terms
from pipeline.model import load_causal_lm

from .test_gere_cache import REPLAY_LEN, built, open_cache, replay  # noqa: F401  (module fixtures)


def test_every_pass_is_a_fresh_permutation_using_each_sample_once():
    s = ReplaySampler(num_samples=10, per_step=3, seed=4)
    drawn = [i for _ in range(10) for i in s.next_indices()]  # 30 = three passes
    passes = [drawn[k * 10:(k + 1) * 10] for k in range(3)]
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert passes[0] != passes[1] != passes[2]


def test_sampler_resumes_the_same_sequence_from_its_state():
    a = ReplaySampler(13, 4, seed=1)
    for _ in range(5):
        a.next_indices()
    b = ReplaySampler(13, 4, seed=1)
    b.load_state_dict(a.state_dict())
    assert [a.next_indices() for _ in range(9)] == [b.next_indices() for _ in range(9)]
    with pytest.raises(ValueError, match="seed"):
        ReplaySampler(13, 4, seed=2).load_state_dict(a.state_dict())


def step_inputs(built, index, teacher=None):
    source, _, rows, _, _ = built
    cache = open_cache(built)
    ids, mask = pad_replay_rows([rows["input_ids"][i] for i in index], REPLAY_LEN)
    inputs = ReplayInputs(ids, mask, cache.states(index), cache.thresholds.neg, cache.thresholds.pos,
                          cache.features(index))
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
    cfg = ReplayLossConfig(strategy=strategy, fused_tm=False)
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


def test_dynamic_weight_scales_the_term_to_ce_and_passes_no_gradient_through_the_weight():
    task = torch.tensor(2.0, requires_grad=True)
    replay_ce = torch.tensor(1.0, requires_grad=True)
    tm = torch.tensor(0.25, requires_grad=True)
    total, w = combine(ReplayLossConfig(strategy="tm", weight="dynamic"), task, {"replay_ce": replay_ce, "tm": tm})
    total.backward()
    assert w == pytest.approx(3.0 / 0.25)
    assert total.item() == pytest.approx(3.0 + 3.0)
    assert task.grad.item() == 1.0 and tm.grad.item() == pytest.approx(w)  # w is a constant in the graph
    fixed, w100 = combine(ReplayLossConfig(strategy="tm", weight=100.0), task.detach(), {"replay_ce": replay_ce.detach(),
                                                                                     "tm": tm.detach()})
    assert w100 == 100.0 and fixed.item() == pytest.approx(3.0 + 25.0)
    assert combine(ReplayLossConfig(strategy="none"), task.detach(), {})[0].item() == 2.0


@pytest.mark.parametrize("bad", [{"strategy": "mse"}, {"weight": "auto"}, {"weight": -1.0}, {"kl_temperature": 0}])
def test_bad_replay_config_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="replay\\."):
        ReplayLossConfig(**bad)
