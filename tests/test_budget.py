"""The forgetting budget: its control law, its lever in the objective, and a 2-rank run that resumes exactly."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from data_prep.errors import ConfigError
from pipeline.budget import ForgettingBudget, next_scale
from pipeline.checkpoint_files import CheckpointDir, checkpoint_root
from pipeline.config import ForgettingConfig, KDConfig, ReplayConfig
from pipeline.losses.objective import Objective, TaskOutputs

from .train_helpers import make_prep, metrics, run_training, write_config

CFG = ForgettingConfig(budget=0.02, gain=0.5, min_scale=0.01, max_scale=100.0)


def test_the_scale_grows_above_the_budget_shrinks_below_it_and_stays_in_its_bounds():
    assert next_scale(1.0, 0.02, CFG) == pytest.approx(1.0)  # on budget: no change
    assert next_scale(1.0, 0.04, CFG) == pytest.approx(math.exp(0.5))  # twice the budget: one gain step up
    assert next_scale(2.0, 0.0, CFG) == pytest.approx(2.0 * math.exp(-0.5))  # nothing forgotten: give it back
    assert next_scale(50.0, 10.0, CFG) == 100.0 and next_scale(0.02, -5.0, CFG) == 0.01


def test_a_diverged_or_huge_rise_sends_the_scale_to_its_ceiling_without_overflow():
    assert next_scale(1.0, float("nan"), CFG) == 100.0 and next_scale(1.0, float("inf"), CFG) == 100.0
    assert next_scale(1.0, 1e6, CFG) == 100.0 and next_scale(1.0, -1e6, CFG) == 0.01


def test_a_checkpoint_without_budget_state_or_measured_on_other_probe_documents_is_refused():
    probe = datasets.Dataset.from_dict(
        {"id": ["g:1", "g:2", "g:3"], "input_ids": [[1, 2, 3]] * 3, "loss_mask": [[1, 1, 1]] * 3}
    )
    budget = ForgettingBudget(CFG, probe, 8, torch.device("cpu"))
    with pytest.raises(ConfigError, match="no forgetting-budget state"):
        budget.load_state_dict(None)
    fewer = ForgettingBudget(ForgettingConfig(budget=0.02, probe_docs=2), probe, 8, torch.device("cpu"))
    with pytest.raises(ConfigError, match="other probe documents"):
        fewer.load_state_dict({**budget.state_dict(), "base_ppl": 5.0})
    budget.load_state_dict({**budget.state_dict(), "base_ppl": 5.0, "scale": 3.0})
    assert budget.scale == 3.0 and budget.base_ppl == 5.0


def test_the_scale_multiplies_the_kd_weight_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    objective = Objective(ReplayConfig(), KDConfig(weight=0.5))
    task = TaskOutputs(logits, labels, teacher_logits=teacher)

    def loss(scale: float) -> float:
        objective.anti_forgetting_scale = scale
        return float(objective(task, None, global_tokens=10, scale=1.0, grad_accum=1).loss)

    ce, kd = loss(0.0), loss(1.0) - loss(0.0)
    assert kd > 0 and loss(3.0) == pytest.approx(ce + 3.0 * kd, rel=1e-6)


def test_a_budgeted_run_follows_the_law_and_resumes_exactly(sample, tmp_path):
    prep = make_prep(sample, tmp_path / "prep", probe_docs=6)
    budget = {"budget": 0.001, "every": 2, "probe_docs": 6}
    config = write_config(tmp_path / "a.yaml", prep, tmp_path / "a", steps=6, kd={"weight": 1.0}, forgetting=budget)
    run_training(config)
    first = metrics(tmp_path / "a")
    scale = 1.0
    for step in (2, 4, 6):
        row = first[step]
        scale = next_scale(scale, row["forgetting/probe_rise"], ForgettingConfig(**budget))
        assert row["forgetting/scale"] == pytest.approx(scale, rel=1e-12), step
    assert {s for s, r in first.items() if "forgetting/scale" in r} == {2, 4, 6}
    assert first[2]["forgetting/scale"] != 1.0
    # Resume from step 2 in another run directory: the controller's state comes back with the checkpoint.
    step2 = CheckpointDir.for_step(checkpoint_root(tmp_path / "a"), 2).path
    resumed = write_config(
        tmp_path / "b.yaml",
        prep,
        tmp_path / "b",
        steps=6,
        kd={"weight": 1.0},
        forgetting=budget,
        checkpoint={"resume": str(step2)},
    )
    run_training(resumed)
    second = metrics(tmp_path / "b")
    for step in (3, 4, 5, 6):
        for key in ("loss", "loss/kd", "forgetting/probe_rise", "forgetting/scale"):
            if key in first[step]:
                assert second[step][key] == first[step][key], (step, key)  # bitwise
