"""The forgetting budget: its control law, its lever in the objective, and a 2-rank run that resumes exactly."""

from __future__ import annotations

import dataclasses
import math

import datasets
import pytest
import torch

from cpt_core.errors import ConfigError
from pipeline.checkpoint.files import CheckpointDir, checkpoint_root
from pipeline.config import ForgettingConfig, KDConfig, ReplayConfig, load_train_config
from pipeline.evaluation.perplexity import perplexity_change
from pipeline.losses.objective import Objective
from pipeline.training.budget import (
    ForgettingBudget,
    clamp_level,
    level_bounds,
    levers,
    next_level,
    proportional_step,
)
from pipeline.training.schedule import lr_at

from .test_replay_loss import objective_inputs
from .train_helpers import make_prep, metrics, run_training, write_config

CFG = ForgettingConfig(budget=0.02, gain=0.5, lookahead=0.0, min_scale=0.01, max_scale=100.0)


def test_the_level_moves_with_the_error_and_drives_the_weights_first_then_the_lr_brake():
    assert next_level(0.0, 0.02, 0.02, CFG) == pytest.approx(0.0)  # on budget: no change
    assert next_level(0.0, 0.04, 0.04, CFG) == pytest.approx(0.5)  # twice the budget: one gain step up
    assert next_level(1.0, 0.0, 0.0, CFG) == pytest.approx(0.5)  # nothing forgotten: give it back
    top, floor = math.log(100.0), math.log(0.01)
    assert levers(0.0, CFG) == (1.0, 1.0) and levers(floor, CFG) == pytest.approx((0.01, 1.0))
    assert levers(top, CFG) == pytest.approx((100.0, 1.0))  # weights at their ceiling, lr untouched
    assert levers(top + math.log(4.0), CFG) == pytest.approx((100.0, 0.25))  # beyond it: the brake
    ceiling = top - math.log(CFG.min_lr_scale)
    assert next_level(ceiling - 0.1, 10.0, 10.0, CFG) == ceiling and next_level(floor + 0.1, -5.0, -5.0, CFG) == floor
    assert levers(ceiling, CFG) == pytest.approx((100.0, CFG.min_lr_scale))


def test_the_lookahead_acts_on_where_the_rise_is_heading():
    ahead = dataclasses.replace(CFG, lookahead=2.0)
    # under budget but climbing 0.01 per probe: projected 0.03, half a budget over, so protection rises now
    assert next_level(0.0, 0.01, 0.0, ahead) == pytest.approx(0.25)
    assert next_level(0.0, 0.01, 0.0, CFG) == pytest.approx(-0.25)  # without it the level would still fall
    # falling back: taken as measured, not projected, so the level does not release on a trend
    assert next_level(1.0, 0.04, 0.05, ahead) == next_level(1.0, 0.04, 0.05, CFG) == pytest.approx(1.5)
    assert next_level(1.0, 0.01, 0.2, ahead) == pytest.approx(0.75)  # far under budget: one measured step


def test_a_cautious_start_begins_at_full_protection_and_a_neutral_one_at_scale_1_and_full_lr():
    probe = datasets.Dataset.from_dict({"id": ["g:1"], "input_ids": [[1, 2, 3]], "loss_mask": [[1, 1, 1]]})
    cautious = ForgettingBudget(dataclasses.replace(CFG, cautious_start=True), probe, 8, torch.device("cpu"))
    assert (cautious.scale, cautious.lr_scale) == pytest.approx((CFG.max_scale, CFG.min_lr_scale))
    neutral = ForgettingBudget(CFG, probe, 8, torch.device("cpu"))  # the default
    assert (neutral.scale, neutral.lr_scale) == (1.0, 1.0)


def test_each_update_projects_from_the_rise_the_last_update_measured():
    """Uniform logits over V tokens score perplexity V exactly, so the probe's rise is scripted."""
    probe = datasets.Dataset.from_dict({"id": ["g:1", "g:2"], "input_ids": [[1, 2, 3]] * 2, "loss_mask": [[1] * 3] * 2})
    law = dataclasses.replace(CFG, lookahead=2.0)
    budget = ForgettingBudget(law, probe, 8, torch.device("cpu"))

    def uniform(vocab: int):
        return lambda ids: torch.zeros(*ids.shape, vocab)

    budget.start(uniform(100))
    level, previous = 0.0, 0.0
    for vocab in (101, 103, 102, 102):  # climbs, then falls back: projected, then taken as measured
        budget.update(uniform(vocab))
        rise = budget.rise
        assert rise == pytest.approx(vocab / 100 - 1, abs=1e-6)  # fp32 perplexity
        level, previous = next_level(level, rise, previous, law), rise
        assert budget.level == level, vocab
    # by hand: 0.5 · (0.01 + 2 · 0.01 − 0.02) / 0.02, then 0.5 · (0.03 + 2 · 0.02 − 0.02) / 0.02, then 0, 0
    assert budget.level == pytest.approx(0.25 + 1.25, abs=1e-3)


def test_the_proportional_term_moves_the_levers_with_the_last_error_and_the_integral_by_gain():
    probe = datasets.Dataset.from_dict({"id": ["g:1"], "input_ids": [[1, 2, 3]], "loss_mask": [[1, 1, 1]]})
    law = dataclasses.replace(CFG, gain=0.1, proportional=2.0)
    budget = ForgettingBudget(law, probe, 8, torch.device("cpu"))
    budget.start(lambda ids: torch.zeros(*ids.shape, 100))  # uniform logits: ppl = vocab, a scripted rise
    expected = {104: (0.1, 2.1), 102: (0.1, 0.1), 100: (0.0, -2.0)}  # vocab: (integral, level the levers read)
    for vocab, (integral, level) in expected.items():  # twice the budget (e = 1), on it (0), nothing lost (-1)
        budget.update(lambda ids, v=vocab: torch.zeros(*ids.shape, v))
        assert budget.level == pytest.approx(integral, abs=1e-5), vocab
        assert budget.scale == pytest.approx(math.exp(level), rel=1e-4), vocab
    restored = ForgettingBudget(law, probe, 8, torch.device("cpu"))
    restored.load_state_dict(budget.state_dict())
    assert (restored.scale, restored.lr_scale) == (budget.scale, budget.lr_scale)
    # a cautious start is full protection until the first probe: no error measured, no proportional term
    cautious = ForgettingBudget(dataclasses.replace(law, cautious_start=True), probe, 8, torch.device("cpu"))
    assert (cautious.scale, cautious.lr_scale) == pytest.approx((CFG.max_scale, CFG.min_lr_scale))
    assert proportional_step(float("nan"), 0.0, law) == 50.0  # a diverged probe: the level's ceiling


def test_release_0_brakes_at_the_proportional_gain_and_leaves_the_release_to_the_integral():
    law = dataclasses.replace(CFG, gain=0.1, proportional=2.0)
    brake_only = dataclasses.replace(law, release=0.0)
    # nothing forgotten yet (the first probe): e = -1, so PI's levers drop to exp(-2.1); brake-only's only by gain
    assert proportional_step(0.0, 0.0, law) == pytest.approx(-2.0) and proportional_step(0.0, 0.0, brake_only) == 0
    assert next_level(0.0, 0.0, 0.0, brake_only) == next_level(0.0, 0.0, 0.0, law) == pytest.approx(-0.1)
    # over the budget both brake alike; a half release halves the step under it
    assert proportional_step(0.03, 0.02, brake_only) == proportional_step(0.03, 0.02, law) == pytest.approx(1.0)
    half = dataclasses.replace(law, release=0.5)
    assert proportional_step(0.01, 0.02, half) == pytest.approx(0.5 * proportional_step(0.01, 0.02, law))
    probe = datasets.Dataset.from_dict({"id": ["g:1"], "input_ids": [[1, 2, 3]], "loss_mask": [[1, 1, 1]]})
    budget = ForgettingBudget(brake_only, probe, 8, torch.device("cpu"))
    budget.start(lambda ids: torch.zeros(*ids.shape, 100))  # uniform logits: ppl = vocab
    budget.update(lambda ids: torch.zeros(*ids.shape, 100))  # the rise 0: the levers read the integral alone
    assert budget.scale == pytest.approx(math.exp(-0.1), rel=1e-6)
    budget.update(lambda ids: torch.zeros(*ids.shape, 104))  # twice the budget: integral and brake both act
    assert budget.scale == pytest.approx(math.exp(-0.1 + 0.1 + 2.0), rel=1e-4)


def test_the_probe_rise_is_the_perplexity_ratio_and_its_error_matches_resampling_the_documents():
    """The standard error against a bootstrap over documents (the reference), on heterogeneous documents: a few
    long ones that forget a lot beside many short ones that forget little, as the tiny base's probe did."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.cat([torch.full((20,), 1500.0), torch.randint(50, 300, (180,), generator=g).double()])
    base_nll = tokens * (4.0 + torch.rand(200, generator=g, dtype=torch.float64))
    per_token = torch.cat([torch.full((20,), 0.12), torch.full((180,), 0.01)]) + 0.02 * torch.randn(
        200, generator=g, dtype=torch.float64
    )
    base, now = torch.stack([base_nll, tokens], 1), torch.stack([base_nll + per_token * tokens, tokens], 1)
    rise, error = perplexity_change(base, now)
    assert rise == pytest.approx(math.exp(now[:, 0].sum() / tokens.sum()) / math.exp(base_nll.sum() / tokens.sum()) - 1)
    draws = torch.randint(0, 200, (4000, 200), generator=g)
    resampled = [perplexity_change(base[i], now[i])[0] for i in draws]
    assert error == pytest.approx(float(torch.tensor(resampled).std()), rel=0.1)
    assert perplexity_change(base, base) == (0.0, 0.0)
    assert math.isnan(perplexity_change(base[:1], now[:1])[1])  # one document: no spread to measure
    assert all(math.isnan(x) for x in perplexity_change(base[:0], now[:0]))  # no token: no figure


def test_the_probe_scores_whole_documents_and_a_resumed_budget_reads_the_same_rise():
    """A 20-token document at seq_len 8 is three windows, 19 predicted tokens; its first window alone is 7."""
    probe = datasets.Dataset.from_dict(
        {"id": ["g:1", "g:2"], "input_ids": [list(range(1, 21)), [1, 2, 3]], "loss_mask": [[1] * 20, [1] * 3]}
    )
    budget = ForgettingBudget(CFG, probe, 8, torch.device("cpu"))
    budget.start(lambda ids: torch.zeros(*ids.shape, 100))
    assert budget.base_docs[:, 1].tolist() == [19.0, 2.0] and budget.base_ppl == pytest.approx(100.0)
    logged = budget.update(lambda ids: torch.zeros(*ids.shape, 102))
    assert logged["forgetting/probe_rise"] == pytest.approx(0.02, abs=1e-6)
    assert logged["forgetting/probe_rise_se"] == pytest.approx(0.0, abs=1e-6)  # every document rose alike
    resumed = ForgettingBudget(CFG, probe, 8, torch.device("cpu"))
    resumed.load_state_dict(budget.state_dict())
    assert torch.equal(resumed.base_docs, budget.base_docs)
    logged = resumed.update(lambda ids: torch.zeros(*ids.shape, 102))
    assert logged["forgetting/probe_rise"] == pytest.approx(0.02, abs=1e-6)
    tokenless = datasets.Dataset.from_dict({"id": ["g:1"], "input_ids": [[7]], "loss_mask": [[1]]})
    with pytest.raises(ConfigError, match="predict no token"):
        ForgettingBudget(CFG, tokenless, 8, torch.device("cpu")).start(lambda ids: torch.zeros(*ids.shape, 100))


def test_a_margin_holds_the_rise_plus_its_standard_error_under_the_budget():
    law = dataclasses.replace(CFG, margin=1.5)
    # 0.01 measured ± 0.004: held as 0.016, under the 0.02 budget by a fifth; without a margin by half
    assert next_level(0.0, 0.01, 0.01, law, rise_se=0.004) == pytest.approx(0.5 * -0.2)
    assert next_level(0.0, 0.01, 0.01, CFG, rise_se=0.004) == pytest.approx(0.5 * -0.5)
    assert next_level(0.0, 0.01, 0.01, law, rise_se=float("nan")) == next_level(0.0, 0.01, 0.01, CFG)  # no error
    # through the probe: two documents of 2 tokens, one forgets and one does not, so the error is known
    two = {"id": ["g:1", "g:2"], "input_ids": [[1, 2, 3], [4, 5, 6]], "loss_mask": [[1] * 3] * 2}
    probe = datasets.Dataset.from_dict(two)
    budget = ForgettingBudget(law, probe, 8, torch.device("cpu"))
    budget.start(lambda ids: torch.zeros(*ids.shape, 100))

    def first_doc_worse(ids: torch.Tensor) -> torch.Tensor:  # uniform over 104 tokens in its rows, else over 100
        others = (ids[:, :1] != 1).unsqueeze(-1) & (torch.arange(104) >= 100)
        return torch.zeros(*ids.shape, 104).masked_fill(others, float("-inf"))

    logged = budget.update(first_doc_worse)
    rise, error = logged["forgetting/probe_rise"], logged["forgetting/probe_rise_se"]
    assert rise == pytest.approx(math.sqrt(1.04) - 1, rel=1e-4) and error > 0.01
    assert budget.level == pytest.approx(next_level(0.0, rise, 0.0, CFG, rise_se=0.0) + 0.5 * 1.5 * error / 0.02)


def test_a_diverged_or_huge_rise_sends_the_level_to_its_ceiling_without_overflow():
    ceiling = math.log(100.0) - math.log(CFG.min_lr_scale)
    assert next_level(0.0, float("nan"), 0.0, CFG) == ceiling and next_level(0.0, float("inf"), 0.0, CFG) == ceiling
    assert next_level(0.0, 1e6, 0.0, CFG) == ceiling and next_level(0.0, -1e6, 0.0, CFG) == math.log(0.01)
    ahead = dataclasses.replace(CFG, lookahead=2.0)
    assert next_level(0.0, float("inf"), float("inf"), ahead) == ceiling
    # after a diverged probe the next finite rise is taken as measured, with or without the lookahead
    assert next_level(1.0, 0.01, float("nan"), CFG) == next_level(1.0, 0.01, float("nan"), ahead) == 0.75


def test_a_checkpoint_without_budget_state_of_another_format_or_on_other_probe_documents_is_refused():
    probe = datasets.Dataset.from_dict(
        {"id": ["g:1", "g:2", "g:3"], "input_ids": [[1, 2, 3]] * 3, "loss_mask": [[1, 1, 1]] * 3}
    )
    budget = ForgettingBudget(CFG, probe, 8, torch.device("cpu"))
    with pytest.raises(ConfigError, match="no forgetting-budget state"):
        budget.load_state_dict(None)
    budget.start(lambda ids: torch.zeros(*ids.shape, 100))
    with pytest.raises(ConfigError, match="format version None"):
        budget.load_state_dict({k: v for k, v in budget.state_dict().items() if k != "version"})
    fewer = ForgettingBudget(ForgettingConfig(budget=0.02, probe_docs=2), probe, 8, torch.device("cpu"))
    with pytest.raises(ConfigError, match="other probe documents"):
        fewer.load_state_dict({**budget.state_dict(), "base_ppl": 5.0})
    budget.load_state_dict({**budget.state_dict(), "base_ppl": 5.0, "level": math.log(3.0)})
    assert budget.scale == pytest.approx(3.0) and budget.base_ppl == 5.0
    # a level set under a lower min_lr_scale than this run's comes back at this run's full brake
    budget.load_state_dict({**budget.state_dict(), "level": 50.0})
    assert budget.level == pytest.approx(math.log(CFG.max_scale) - math.log(CFG.min_lr_scale))


def test_watching_logs_the_rise_and_leaves_both_levers_at_exactly_1_even_from_a_budgeted_checkpoint():
    probe = datasets.Dataset.from_dict({"id": ["g:1", "g:2"], "input_ids": [[1, 2, 3]] * 2, "loss_mask": [[1] * 3] * 2})
    watch = ForgettingBudget(ForgettingConfig(watch=True), probe, 8, torch.device("cpu"))
    watch.start(lambda ids: torch.zeros(*ids.shape, 100))
    logged = watch.update(lambda ids: torch.zeros(*ids.shape, 150))  # +50%: a budget would brake hard
    assert logged.keys() == {"forgetting/probe_rise", "forgetting/probe_rise_se"}
    assert logged["forgetting/probe_rise"] == pytest.approx(0.5, abs=1e-6)
    assert (watch.level, watch.scale, watch.lr_scale) == (0.0, 1.0, 1.0)
    held = ForgettingBudget(CFG, probe, 8, torch.device("cpu"))
    held.start(lambda ids: torch.zeros(*ids.shape, 100))
    held.update(lambda ids: torch.zeros(*ids.shape, 150))
    assert held.scale > 1.0
    watch.load_state_dict(held.state_dict())  # a budgeted run resumed with only the watch
    assert (watch.scale, watch.lr_scale) == (1.0, 1.0) and watch.rise == held.rise
    # settings that only a budget reads leave a watch alone: a cautious start would brake the lr to 5%
    cautious = ForgettingBudget(
        ForgettingConfig(watch=True, cautious_start=True, max_scale=0.5), probe, 8, torch.device("cpu")
    )
    assert (cautious.scale, cautious.lr_scale) == (1.0, 1.0)


def test_a_watch_beside_a_budget_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    body = "steps: 2\nmodel: {path: m}\ndata: {prep: p}\nkd: {weight: 1.0}\nforgetting: {budget: 0.05, watch: true}\n"
    config.write_text(body)
    with pytest.raises(ConfigError, match="forgetting.watch"):
        load_train_config(config)
    config.write_text(body.replace(", watch: true", ""))
    assert load_train_config(config).forgetting.budget == 0.05


def test_a_watched_run_trains_bitwise_as_the_unwatched_one_and_logs_its_forgetting_curve(sample, tmp_path):
    """The probe's forwards between steps (all ranks, eval mode, ZeRO-3 gathers) leave the training alone: a
    watched naive run (nothing to scale, so no budget could run) logs the same losses, lr and final eval."""
    prep = make_prep(sample, tmp_path / "prep", probe_docs=6)
    sections = {"steps": 4, "checkpoint": {"every": 0}, "optim": {"lr": 0.05, "warmup_steps": 1}}
    plain = write_config(tmp_path / "plain.yaml", prep, tmp_path / "plain", **sections)
    watched = write_config(
        tmp_path / "watched.yaml", prep, tmp_path / "watched", **sections, forgetting={"watch": True, "every": 2}
    )
    run_training(plain)
    run_training(watched)
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "watched")
    assert {s for s, r in b.items() if "forgetting/probe_rise" in r} == {2, 4}
    assert not any("forgetting/scale" in r or "forgetting/lr_scale" in r for r in b.values())
    assert b[4]["forgetting/probe_rise"] != 0.0 and b[4]["forgetting/probe_rise_se"] > 0
    for step, row in a.items():
        for key in ("loss", "lr", "grad_norm", "ppl/general", "ppl/domain"):
            if key in row:
                assert b[step][key] == row[key], (step, key)  # bitwise


def test_the_scale_multiplies_replay_ce_the_replay_term_and_kd_and_leaves_task_ce_alone():
    task, replay = objective_inputs()
    g = torch.Generator().manual_seed(1)
    task.teacher_logits = torch.randn(task.logits.shape, generator=g)
    objective = Objective(ReplayConfig(strategy="l2", weight=0.5, ce_weight=2.0), KDConfig(weight=0.5))

    def loss(scale: float) -> float:
        objective.anti_forgetting_scale = scale
        return float(objective(task, replay, global_tokens=10, scale=1.0, grad_accum=1).loss)

    task_ce, guarded = loss(0.0), loss(1.0) - loss(0.0)
    ce_sum = torch.nn.functional.cross_entropy(
        task.logits[:, :-1].flatten(0, 1), task.labels[:, 1:].flatten(), reduction="sum"
    )
    assert task_ce == pytest.approx(float(ce_sum) / 10, rel=1e-6)
    assert guarded > 0 and loss(3.0) == pytest.approx(task_ce + 3.0 * guarded, rel=1e-6)
    objective.anti_forgetting_scale = 3.0
    assert objective.kd_weight == 1.5 and objective.replay_ce_weight == 6.0


def test_a_budgeted_run_follows_the_law_brakes_its_lr_and_resumes_exactly(sample, tmp_path):
    prep = make_prep(sample, tmp_path / "prep", probe_docs=6)
    # A from-scratch model's probe perplexity falls as it learns; an lr of 0.1 makes it rise. A cautious start
    # brakes step 1 (the trainer must apply the level before the first step); max_scale 1.5 keeps the brake
    # within the few updates of a 6-step run.
    budget = {"budget": 0.001, "every": 2, "probe_docs": 6, "max_scale": 1.5, "min_lr_scale": 0.1}
    budget |= {"lookahead": 2.0, "cautious_start": True, "proportional": 0.5}
    sections = {"steps": 6, "kd": {"weight": 1.0}, "forgetting": budget, "optim": {"lr": 0.1, "warmup_steps": 1}}
    config = write_config(tmp_path / "a.yaml", prep, tmp_path / "a", **sections, checkpoint={"every": 1})
    run_training(config)
    first = metrics(tmp_path / "a")
    cfg, law = load_train_config(config), ForgettingConfig(**budget)
    level, previous = level_bounds(law)[1], 0.0  # a cautious start: full protection from the first step
    brake = {0: levers(level, law)[1]}  # brake[k]: the lr multiplier after the update at step k
    for step in (2, 4, 6):
        rise = first[step]["forgetting/probe_rise"]
        push = proportional_step(rise, previous, law)
        level, previous = next_level(level, rise, previous, law), rise
        scale, brake[step] = levers(clamp_level(level + push, law), law)
        assert first[step]["forgetting/scale"] == pytest.approx(scale, rel=1e-12), step
        assert first[step]["forgetting/lr_scale"] == pytest.approx(brake[step], rel=1e-12), step
    assert {s for s, r in first.items() if "forgetting/scale" in r} == {2, 4, 6}
    # six documents scored by two ranks: the per-document sums reach every rank, so the spread is measured
    assert all(first[s]["forgetting/probe_rise_se"] > 0 for s in (2, 4, 6))
    # Steps 1-2 run at the cautious start's scale (the first update follows step 2); the logged loss is the
    # optimized one. Step 2's, since at step 1 the student is its teacher and KD is 0.
    assert first[2]["loss/kd"] > 1e-6, first[2]
    scaled = first[2]["loss/task_ce"] + law.max_scale * sections["kd"]["weight"] * first[2]["loss/kd"]
    assert first[2]["loss"] == pytest.approx(scaled, rel=1e-9)
    # braked from step 1, then moved: the lr checks below see the start's brake and a moved one
    assert brake[0] < 1.0 and brake[2] != brake[0], brake
    for step in range(1, 7):  # an update after step k sets the lr from step k + 1 on; the start, step 1's
        applied = max(k for k in brake if k <= step - 1)
        scheduled = lr_at(step - 1, cfg.peak_lr, 6, cfg.optim.warmup_steps, cfg.optim.decay, cfg.optim.min_lr_ratio)
        assert first[step]["lr"] == pytest.approx(scheduled * brake[applied], rel=1e-9), step
    # Resume from step 2 in another run directory: the controller's state comes back with the checkpoint.
    step2 = CheckpointDir.for_step(checkpoint_root(tmp_path / "a"), 2).path
    resumed = write_config(tmp_path / "b.yaml", prep, tmp_path / "b", **sections, checkpoint={"resume": str(step2)})
    run_training(resumed)
    second = metrics(tmp_path / "b")
    controller = ("forgetting/probe_rise", "forgetting/probe_rise_se", "forgetting/scale", "forgetting/lr_scale")
    for step in (3, 4, 5, 6):
        for key in ("loss", "loss/kd", "lr", *controller):
            if key in first[step]:
                assert second[step][key] == first[step][key], (step, key)  # bitwise
    # Step 1's checkpoint resumed with no budget: its optimizer carries the cautious start's brake, and step 2
    # must run at the schedule's own lr.
    step1 = CheckpointDir.for_step(checkpoint_root(tmp_path / "a"), 1).path
    sections.pop("forgetting")
    unbudgeted = write_config(tmp_path / "c.yaml", prep, tmp_path / "c", **sections, checkpoint={"resume": str(step1)})
    run_training(unbudgeted)
    third = metrics(tmp_path / "c")
    assert first[2]["lr"] < third[2]["lr"]  # braked in the budgeted run
    for step in (2, 3):
        scheduled = lr_at(step - 1, cfg.peak_lr, 6, cfg.optim.warmup_steps, cfg.optim.decay, cfg.optim.min_lr_ratio)
        assert third[step]["lr"] == pytest.approx(scheduled, rel=1e-9), step
