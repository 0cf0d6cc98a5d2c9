"""The training loop: resume, then step, log, checkpoint and evaluate until done.

One step = grad_accum micro-batches per rank of packed task rows (+ replay
samples, each alone in a slot of replay_len tokens: packed behind the task rows
in their forward, or padded rows in a forward of their own; ``replay.forward``).
Forwards return final hidden states, and the losses
apply the output head in chunks (``pipeline/losses/head.py``), where the model
allows it. The loss is formed by ``pipeline/losses/objective.py``;
each component (engines, replay feed, penalty, forgetting budget, checkpoints) is built from the
config in its own module and handed to this loop.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist

from cpt_core.errors import ConfigError
from data_prep.prep_dir import PrepDir
from data_prep.tokenizer import load_tokenizer

from ..checkpoint.files import checkpoint_root
from ..checkpoint.manager import CheckpointManager
from ..config import TrainConfig, to_dict
from ..evaluation.perplexity import holdout_losses, logits_of, perplexities
from ..gere.feed import ReplayFeed
from ..gere.joint import joint_hidden
from ..gere.sampler import ReplayChunk
from ..losses.head import frozen_head_weight
from ..losses.objective import Objective, ReplayOutputs, TaskOutputs
from ..runtime.distributed import local_device
from ..runtime.ds_config import filled_ds_config
from ..runtime.isolation import forward_packed
from ..runtime.model import hidden_size, model_sources, needs_teacher
from ..runtime.precision import enable_tf32, resolve_precision
from .adapter import uses_adapter
from .budget import ForgettingBudget
from .data import (
    GlobalOrder,
    StepReader,
    global_loss_tokens,
    host_to_device,
    role_flags,
    teacher_rows,
)
from .engine import build_engine, build_teacher
from .metrics import MetricsLogger, PeakMemory, device_peak_flops, model_flops_utilization
from .penalty import build_anchor_pull
from .schedule import lr_at, warmup_steps_for

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        resolve_precision(cfg)  # before anything reads model.dtype; the checkpoint records the concrete dtype
        enable_tf32()
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(cfg.run_dir)
        self.prep = PrepDir(cfg.data.prep).read()
        self.mixture = datasets.load_from_disk(str(self.prep.mixture_rows))
        self.seq_len = self.prep.seq_len
        self.order = GlobalOrder(len(self.mixture), cfg.batch.micro_batch, cfg.batch.grad_accum, self.world, self.rank)
        self.total_steps = cfg.steps or math.ceil(cfg.tokens / (self.order.global_batch * self.seq_len))
        self.warmup = warmup_steps_for(self.total_steps, cfg.optim.warmup_steps, cfg.optim.warmup_ratio)
        tokenizer = load_tokenizer(self.prep.tokenizer)
        self.memory = PeakMemory(local_device())  # before any model: what pipeline.plan predicts is above this
        base, start = model_sources(cfg)
        ds_cfg = filled_ds_config(cfg, self.world, hidden_size(start))
        self.checkpoints = CheckpointManager(
            checkpoint_root(self.run_dir), cfg.checkpoint.keep_last, self.rank, self.world, uses_adapter(cfg.adapter)
        )
        self.resume_from, universal = self.checkpoints.resume_point(cfg.checkpoint.resume)
        if universal:
            ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
        self.budget: ForgettingBudget | None = None  # the lr schedule reads its brake (built below)
        self.engine = build_engine(cfg, start, ds_cfg, self._scheduler, tokenizer, self.seq_len)
        self.device = self.engine.device
        self.teacher = build_teacher(cfg, base, ds_cfg, self.engine) if needs_teacher(cfg) else None
        distill_general = cfg.kd.weight > 0 and cfg.kd.rows == "general"
        self.distilled = role_flags(self.mixture, "general") if distill_general else None  # None: every row
        self.head = getattr(self.engine.module, "head_loss", None)
        self.replay = ReplayFeed.from_config(
            cfg, self.prep, base, tokenizer.fingerprint, self.world, self.rank, self.device, self.head is not None
        )
        self.pull = build_anchor_pull(cfg, self.engine, self.prep.replay, self.world, self.rank)  # at the start weights
        distils = cfg.kd.weight > 0 or cfg.replay.strategy == "kl"
        teacher_head = frozen_head_weight(self.teacher.module) if self.head is not None and distils else None
        self.objective = Objective(cfg.replay, cfg.kd, self.head, teacher_head)
        self.budget = self._forgetting_budget()
        self.step, self.tokens_seen = 0, 0
        self._resume()
        if self.budget is not None and self.budget.base_ppl is None:
            with self._eval_mode():
                self.budget.start(logits_of(self.engine))
        # The first step's lr was set before the budget existed (a cautious start brakes it), and a resumed
        # optimizer's lr is the one saved, braked if the checkpoint's run had a budget. Without a budget, or
        # watching, the levers read 1: this sets the schedule's own lr, the value LambdaLR set (a test compares
        # a watched run's losses bitwise), and undoes the brake a budgeted checkpoint's optimizer carries.
        self._apply_levers()
        self.reader = StepReader(self.mixture, self.order, self.device)
        self.metrics = MetricsLogger(
            self.run_dir, self.rank, self.total_steps, self.step, cfg.log.tensorboard, cfg.log.every, cfg.log.every_s
        )
        self.holdout = {
            role: datasets.load_from_disk(str(p))
            for role, p in self.prep.holdout.items()
            if role in ("general", "domain")
        }
        self._stop = False
        self.peak_flops = device_peak_flops(cfg.log.peak_tflops)
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())

    # --- the loop -------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Step until done: log, evaluate and checkpoint on their schedules; save and stop on a signal."""
        # SLURM preemption signals every process of the job step and Ctrl-C the whole foreground process
        # group, so each rank sees the signal itself; ranks agree on the step to stop at (_should_stop).
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        last: dict[str, Any] = {}
        try:
            if (
                self.step == 0 and self.cfg.eval.every
            ):  # the base model's point: each curve starts where it forgets from
                self.metrics.log(0, self.evaluate())
            while self.step < self.total_steps:
                last = self._timed_step()
                if self.budget is not None and self._due(self.cfg.forgetting.every):
                    with self._eval_mode():
                        last.update(self.budget.update(logits_of(self.engine)))
                    self._apply_levers()
                self._log(last)
                if self._due(self.cfg.eval.every) and self.step < self.total_steps:
                    self.metrics.log(self.step, self.evaluate())
                if self._should_stop():
                    self._save_on_signal()
                    return last
                if self._due(self.cfg.checkpoint.every):
                    self.save()
            if not self._due(self.cfg.checkpoint.every):
                self.save()  # the final weights, unless the schedule just saved them
            self.checkpoints.commit(self.engine)
            final = self.evaluate()
            self.metrics.log(self.step, final)
            return {**last, **final}
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.checkpoints.wait_for_deletions()
            self.reader.close()
            self.metrics.close()

    def _timed_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        out = self.train_step()
        self.step += 1
        tokens = self.order.global_batch * self.seq_len
        self.tokens_seen += tokens
        out.update(
            tokens_seen=self.tokens_seen,
            epoch=self.order.epoch(self.step),
            tok_s=tokens / (time.perf_counter() - started),
            peak_mem_gb=self.memory.peak_gb(),
        )
        if self.peak_flops:
            out["mfu"] = model_flops_utilization(out["tok_s"] / self.world, self.n_params, self.peak_flops)
        return out

    def _log(self, metrics: dict[str, Any]) -> None:
        """A metrics line every log.every steps, at the end, and whenever the probe ran (its rise is logged once)."""
        probed = "forgetting/probe_rise" in metrics
        if self._due(self.cfg.log.every) or self.step == self.total_steps or probed:
            self.metrics.log(self.step, metrics)
        self.metrics.advance(self.step, metrics)

    def _due(self, every: int) -> bool:
        """Whether a schedule of ``every`` steps (0: never) falls on the current step."""
        return bool(every) and self.step % every == 0

    def train_step(self) -> dict[str, Any]:
        cfg, engine = self.cfg, self.engine
        accum, scale = cfg.batch.grad_accum, cfg.batch.grad_accum * self.world
        # Read before the first forward: the loss tokens of the whole global batch are what task CE divides by.
        micro = self.reader.read(self.step)
        global_tokens = global_loss_tokens(micro, self.device)
        replay_chunks = self.replay.step_chunks() if self.replay else [None] * accum
        lr = engine.get_lr()[0]
        sums: dict[str, torch.Tensor] = {}
        weight = 0.0
        for j, (batch, chunk) in enumerate(zip(micro, replay_chunks)):
            task, replay = self._forward(batch, j, chunk)
            part = self.objective(task, replay, global_tokens, scale, accum)
            engine.backward(part.loss)
            if j == accum - 1:  # the optimizer step: an asynchronous save must be on disk before it
                self.checkpoints.commit(engine)
            engine.step()
            for name, value in part.parts.items():
                sums[name] = sums.get(name, 0.0) + value
            if chunk is not None and chunk.real:
                weight = part.replay_weight  # logged: a chunk of padding only weighs nothing
        if self.pull is not None:
            self.pull.apply(lr)
        out = self.objective.summarize(sums, global_tokens, self.world, self.device, weight)
        out.update(lr=lr, grad_norm=float(engine.get_global_grad_norm() or 0.0))
        return out

    def evaluate(self) -> dict[str, float]:
        """Holdout perplexity with whole documents, the estimator of the final report (a curve ends at its figure)."""
        with self._eval_mode():
            return perplexities(
                holdout_losses(
                    logits_of(self.engine),
                    self.holdout,
                    self.seq_len,
                    self.cfg.eval.max_docs,
                    self.device,
                )
            )

    def save(self) -> Path:
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "global_batch": self.order.global_batch,
            "world": self.world,
            "config": to_dict(self.cfg),
            "replay_sampler": self.replay.state_dict() if self.replay else None,
            "forgetting_budget": self.budget.state_dict() if self.budget else None,
        }
        return self.checkpoints.save(self.engine, self.step, state)

    # --- pieces ---------------------------------------------------------------------------------------

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        self.engine.eval()
        try:
            yield
        finally:
            self.engine.train()

    def _forgetting_budget(self) -> ForgettingBudget | None:
        forgetting = self.cfg.forgetting
        if forgetting.budget is None and not forgetting.watch:
            return None
        if self.prep.probe is None:
            raise ConfigError(
                f"{forgetting.probe_setting} needs probe documents: {self.cfg.data.prep} has none; prepare it "
                "with replay.probe_docs > 0"
            )
        return ForgettingBudget(
            self.cfg.forgetting, datasets.load_from_disk(str(self.prep.probe)), self.seq_len, self.device
        )

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Warmup and decay, times the forgetting budget's lr brake (1 without a budget); the brake's level is
        in the checkpoint, so a resumed run's lr is the same."""
        peak, optim = self.cfg.peak_lr, self.cfg.optim

        def brake() -> float:
            return self.budget.lr_scale if self.budget is not None else 1.0

        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: (
                lr_at(
                    s,
                    peak,
                    self.total_steps,
                    self.warmup,
                    optim.decay,
                    optim.min_lr_ratio,
                    optim.wsd_decay_fraction,
                    optim.wsd_decay_shape,
                )
                / peak
                * brake()
            ),
        )

    def _apply_levers(self) -> None:
        """Put the budget's level into effect for the coming step: the scale on the anti-forgetting weights,
        and the lr set again with the brake. The budget updates after the step, when the scheduler has already
        set the next lr, so without this the brake would act a step later: at 10x lr on the bench's tiny base,
        that one unbraked step took the probe's rise from 36% to 121%. Without a budget both levers are 1."""
        self.objective.anti_forgetting_scale = self.budget.scale if self.budget is not None else 1.0
        sched = self.engine.lr_scheduler
        for group, base_lr, factor in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base_lr * factor(sched.last_epoch)  # LambdaLR's own rule, at the step it is at

    def _forward(
        self, batch: dict[str, torch.Tensor], micro_index: int, chunk: ReplayChunk | None
    ) -> tuple[TaskOutputs, ReplayOutputs | None]:
        """Micro-batch ``micro_index``'s task rows and replay samples (``chunk``; None: none) through the
        model: one forward, or the task forward and then the replay forward (``replay.forward``)."""
        if chunk is None:
            return self._task_forward(batch, micro_index), None
        layout = self.replay.layout
        if layout is None:
            return self._task_forward(batch, micro_index), self._replay_forward(chunk)
        inputs = self.replay.inputs(chunk, self.device, self.teacher)
        task_hidden, replay_hidden = joint_hidden(
            self.engine,
            batch["input_ids"],
            batch["position_ids"],
            inputs.input_ids,
            layout,
            self.cfg.model.attn_implementation,
        )
        return self._task_forward(batch, micro_index, task_hidden), ReplayOutputs(
            None, replay_hidden, inputs, chunk.share
        )

    def _task_forward(
        self, batch: dict[str, torch.Tensor], micro_index: int, hidden_states: torch.Tensor | None = None
    ) -> TaskOutputs:
        """The task rows' outputs (and the teacher's, for KD); ``hidden_states``: the rows' final hidden states
        from a forward already run (the joint one)."""
        attn, hidden = self.cfg.model.attn_implementation, self.head is not None
        if hidden_states is not None:
            out = hidden_states
        else:
            out = forward_packed(self.engine, batch["input_ids"], batch["position_ids"], attn, hidden)
        task = TaskOutputs(None, batch["labels"], hidden=out) if hidden else TaskOutputs(out, batch["labels"])
        if self.cfg.kd.weight > 0:
            teacher, task.teacher_rows, task.distilled_rows = self._teacher_forward(batch, micro_index)
            if hidden:
                task.teacher_hidden = teacher
            else:
                task.teacher_logits = teacher
        return task

    @torch.no_grad()
    def _teacher_forward(
        self, batch: dict[str, torch.Tensor], micro_index: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(The teacher's outputs, the rows they are for (ascending), the rows KD applies to).

        Without ``kd.rows: general``: (outputs on every row, None, None).

        With ``kd.rows: general`` the teacher runs on the general rows only (:func:`teacher_rows`), and
        not at all in a micro-batch where no rank has one (outputs and rows None). Packed rows attend only within
        themselves, so a row's outputs do not depend on the rows beside it. The outputs stay compact (one per
        row run): the objective distils those rows and computes no teacher logits for the others.
        """
        ids, positions = batch["input_ids"], batch["position_ids"]
        attn, hidden = self.cfg.model.attn_implementation, self.head is not None
        if self.distilled is None:
            return forward_packed(self.teacher, ids, positions, attn, hidden), None, None
        mine = host_to_device(self.distilled[self.order.rows(self.step, micro_index)], self.device)
        run = teacher_rows(self.distilled, self.order, self.step, micro_index)
        if run is None:
            return None, None, mine
        index = host_to_device(run, self.device)
        return forward_packed(self.teacher, ids[index], positions[index], attn, hidden), index, mine

    def _replay_forward(self, chunk: ReplayChunk) -> ReplayOutputs:
        inputs = self.replay.inputs(chunk, self.device, self.teacher)
        # With the head loss every strategy needs only the final hidden states (kl compares them through the
        # head with the teacher's), so the head runs on one position: no [R, L, V] logits.
        head_only = self.head is not None
        out = self.engine(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            output_hidden_states=True,
            use_cache=False,
            **({"logits_to_keep": 1} if head_only else {}),
        )
        return ReplayOutputs(None if head_only else out.logits, out.hidden_states[-1], inputs, chunk.share)

    def _resume(self) -> None:
        if self.resume_from is None:
            return
        state = self.checkpoints.load(self.engine, *self.resume_from)
        if state["global_batch"] != self.order.global_batch:
            raise ConfigError(
                f"checkpoint has global batch {state['global_batch']} rows, this run "
                f"{self.order.global_batch}: the data order would change"
            )
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        if self.replay is not None and state.get("replay_sampler"):
            self.replay.load_state_dict(state["replay_sampler"])
        if self.budget is not None:
            self.budget.load_state_dict(state.get("forgetting_budget"))
        # L2-SP anchors were taken from the start weights before this load: still the run's initial weights.

    def _save_on_signal(self) -> None:
        """Save at a signal only if it can finish before the kill that follows it (the launcher's, or SLURM's at
        the time limit); otherwise keep the last one.

        Ranks decide together (the slowest rank's last save), since a save is collective. An asynchronous
        save's time runs to its commit, a step later: an upper bound on the writing alone, so never too hopeful.
        """
        last = self.checkpoints.last_save_seconds
        slowest = torch.tensor([-1.0 if last is None else last], device=self.device)  # NCCL: device tensors only
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        budget = self.cfg.checkpoint.signal_save_budget
        if slowest.item() > budget:
            log.warning(
                "SIGTERM/SIGINT at step %d: not saving, a save takes %.0f s (checkpoint.signal_save_budget %.0f s); "
                "the last complete checkpoint stays latest",
                self.step,
                slowest.item(),
                budget,
            )
            return
        log.warning("SIGTERM/SIGINT: saving a checkpoint at step %d and exiting", self.step)
        self.save()
        self.checkpoints.commit(self.engine)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop = True

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step, or the save hangs
        return bool(flag.item())
