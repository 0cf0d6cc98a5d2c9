"""The training objective: the one place a step's loss is formed from its parts.

    loss = task CE + kd.weight · KD + replay.ce_weight · replay CE + w · replay term

Task CE and KD are sums over the micro-batch's loss tokens divided by the loss
tokens of the whole global batch, times ``scale`` (grad_accum × ranks, the
factor DeepSpeed divides by): the gradient is the global token mean however the
batch is split over ranks and micro-batches. The replay terms are means over
this micro-batch's replay tokens (each rank's replay rows are an equal share),
times the micro-batch's ``share`` when only some micro-batches carry replay
rows (``pipeline/gere/feed.py``), so they still average to the step's mean.
``w`` is ``replay.weight``, or with ``dynamic`` (task + replay CE) / term with
both detached, so the term has CE's size, capped at ``replay.max_weight``: as the
term nears 0 (a few states just past a threshold) the ratio would grow without
bound and so would the step those few elements get.

With a forgetting budget (``pipeline/training/budget.py``) replay.ce_weight, ``w`` and
kd.weight are all multiplied by its scale, ``anti_forgetting_scale`` (``w``
after the dynamic weight's cap): forgetting.max_scale bounds what the
controller adds. Replay CE is in the lever because it is what holds general
ability: scaling TM alone to 100x at 10x lr crowded replay CE out of the step
and general perplexity kept rising (bench/forgetting.py, the budget rows).

The trainer runs the forwards and hands their outputs here; what this module
returns is exactly what backward sees, and its named parts are what is logged.
Where the model allows it the outputs are final hidden states, not logits, and
CE, KD and the ``kl`` replay strategy go through the model's head loss
(``head.py``), chunked over tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import KDConfig, ReplayConfig
from .kl import kl_sum
from .linear_ce import TeacherHead
from .replay import ReplayInputs, kl_from_hidden, replay_terms

if TYPE_CHECKING:
    from .head import HeadLoss


@dataclass
class TaskOutputs:
    """A micro-batch of packed task rows after the forward: logits, or final hidden states for the head loss."""

    logits: torch.Tensor | None  # [B, L, V]
    labels: torch.Tensor  # [B, L], -100 where no loss
    hidden: torch.Tensor | None = None  # [B, L, H]: instead of logits
    teacher_logits: torch.Tensor | None = None  # frozen base model on teacher_rows (KD)
    teacher_hidden: torch.Tensor | None = None  # instead of teacher_logits, with hidden
    teacher_rows: torch.Tensor | None = None  # [R] row indices the teacher ran on, ascending; None: every row
    distilled_rows: torch.Tensor | None = None  # [B] bool: rows KD applies to (kd.rows: general); None: all


@dataclass
class ReplayOutputs:
    """A micro-batch of replay rows after their forward."""

    logits: torch.Tensor | None  # [R, replay_len, V]; None: replay CE goes through the head loss
    hidden: torch.Tensor  # [R, replay_len, H]: final-layer states, after the final norm
    inputs: ReplayInputs
    share: float = 1.0  # grad_accum / micro-batches with replay: the replay terms' weight in this micro-batch


@dataclass
class MicroBatchLoss:
    loss: torch.Tensor  # what backward sees
    # unweighted parts, additive over micro-batches and ranks (see Objective.summarize): detached float64 0-d
    # tensors on the device, so a micro-batch reads nothing back to the host (a read waits for the GPU and stalls
    # ZeRO-3's prefetch); the step reads them once, in summarize
    parts: dict[str, torch.Tensor]
    replay_weight: float  # w used for the replay term (0 without one)

    @property
    def logged(self) -> dict[str, float]:
        """The parts as numbers (a device-to-host read each: for tests and tools, not the training loop)."""
        return {k: float(v) for k, v in self.parts.items()}


def teacher_rows_first(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """A permutation of ``batch`` rows: ``rows`` (ascending) first, in order, then the others. Sorting a 0/1 key
    keeps it on the device: selecting the other rows with a mask would wait for the GPU to count them."""
    key = torch.ones(batch, dtype=torch.int8, device=rows.device)
    key[rows] = 0
    return torch.argsort(key, stable=True)


class Objective:
    def __init__(
        self,
        replay: ReplayConfig,
        kd: KDConfig,
        head: HeadLoss | None = None,
        teacher_head_weight: torch.Tensor | None = None,
    ) -> None:
        """``head``: the trained model's head loss, for outputs that carry hidden states; ``teacher_head_weight``
        the teacher's output weight, for KD and the kl replay strategy from hidden states."""
        self.replay, self.kd = replay, kd
        self.head, self.teacher_head_weight = head, teacher_head_weight
        self.strategy_term = replay.strategy not in ("none", "ce")  # a term beyond replay CE
        self.anti_forgetting_scale = 1.0  # on replay CE, replay term and KD weights: the forgetting budget's lever

    @property
    def kd_weight(self) -> float:
        return self.kd.weight * self.anti_forgetting_scale

    @property
    def replay_ce_weight(self) -> float:
        return self.replay.ce_weight * self.anti_forgetting_scale

    def __call__(
        self, task: TaskOutputs, replay: ReplayOutputs | None, global_tokens: int, scale: float, grad_accum: int
    ) -> MicroBatchLoss:
        objective_sum, ce_sum, kd_sum = self._task_sums(task)
        loss = objective_sum / global_tokens * scale
        parts = {"task_ce": ce_sum.detach().double()}
        if kd_sum is not None:
            parts["kd"] = kd_sum.detach().double()
        weight = 0.0
        if replay is not None and replay.logits is None and self.replay.strategy == "kl":
            replay_loss, replay_ce, kl, weight = self._kl_from_hidden(replay, (ce_sum / global_tokens * scale).detach())
            loss = loss + replay.share * replay_loss
            parts["replay_ce"] = replay.share * replay_ce.detach().double() / grad_accum
            parts["kl"] = replay.share * kl.detach().double() / grad_accum
        elif replay is not None:
            terms = replay_terms(self.replay, replay.logits, replay.hidden, replay.inputs, self.head)
            share = replay.share
            # share, ce_weight and scale 1.0 (replay in every micro-batch, the defaults) change no bit
            loss = loss + share * self.replay_ce_weight * terms["replay_ce"]
            parts["replay_ce"] = share * terms["replay_ce"].detach().double() / grad_accum
            if self.strategy_term:
                term = terms[self.replay.strategy]
                weight = self.anti_forgetting_scale * self._weight(
                    (ce_sum / global_tokens * scale).detach() + terms["replay_ce"].detach(), term.detach()
                )
                loss = loss + share * weight * term
                parts[self.replay.strategy] = share * term.detach().double() / grad_accum
        return MicroBatchLoss(loss, parts, weight)

    def _task_sums(self, task: TaskOutputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(CE + kd.weight · KD, CE, KD or None without KD): sums over the micro-batch's loss tokens."""
        no_teacher = task.teacher_logits is None and task.teacher_hidden is None
        if self.kd.weight > 0 and no_teacher and task.distilled_rows is not None:
            # kd.rows: general, and no rank has a general row in this micro-batch: the teacher did not run
            both, ce_sum, _ = self._sums(task, distill=False)
            return both, ce_sum, torch.zeros((), device=ce_sum.device)
        return self._sums(task, distill=self.kd.weight > 0)

    def _sums(self, task: TaskOutputs, distill: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        targets = task.labels[:, 1:]
        kd_mask = None
        if distill:
            if task.teacher_logits is None and task.teacher_hidden is None:
                raise ValueError("kd.weight > 0 needs the teacher's outputs on the task rows")
            kd_mask = targets != -100
            if task.distilled_rows is not None:
                kd_mask = kd_mask & task.distilled_rows[:, None]
        rows = task.teacher_rows
        if task.hidden is not None:
            if self.head is None:
                raise ValueError("task outputs carry hidden states but the objective has no head loss")
            hidden, teacher = task.hidden[:, :-1], None
            if kd_mask is not None:
                if rows is not None:  # the teacher's rows first: the head loss distils a prefix of the tokens
                    first = teacher_rows_first(rows, hidden.shape[0])
                    hidden, targets, kd_mask = task.hidden[first, :-1], targets[first], kd_mask[first][: rows.shape[0]]
                teacher = TeacherHead(
                    task.teacher_hidden[:, :-1].flatten(0, 1),
                    self.teacher_head_weight,
                    kd_mask.flatten(),
                    self.kd.temperature,
                )
            both, ce_sum, kd_sum = self.head(hidden.flatten(0, 1), targets.flatten(), teacher, self.kd_weight)
            return both, ce_sum, kd_sum if teacher is not None else None
        ce_sum = F.cross_entropy(
            task.logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
        )
        if kd_mask is None:
            return ce_sum, ce_sum, None
        student = task.logits if rows is None else task.logits[rows]
        kd_mask = kd_mask if rows is None else kd_mask[rows]
        kd_sum = kl_sum(student[:, :-1], task.teacher_logits[:, :-1], kd_mask, self.kd.temperature)
        return ce_sum + self.kd_weight * kd_sum, ce_sum, kd_sum

    def _kl_from_hidden(
        self, replay: ReplayOutputs, task_ce: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(replay_ce_weight · replay CE + w · KL, replay CE, KL, w) of the ``kl`` strategy through the head loss.

        The head loss needs ``w`` before its forward. A fixed weight is known; ``dynamic`` divides by the KL, so a
        no-grad pass measures it first: one more pass of the head's GEMMs over the replay tokens (a small share
        of the step) and, under ZeRO-3, one more gather of the head weight.
        """
        if self.head is None or self.teacher_head_weight is None:
            raise ValueError("replay kl from hidden states needs the model's head loss and the teacher's head weight")
        teacher, temperature = self.teacher_head_weight, self.replay.kl_temperature
        # (ce_weight, kl_weight) → (weighted sum, replay CE, KL)
        run = functools.partial(kl_from_hidden, self.head, replay.hidden, replay.inputs, teacher, temperature)
        if self.replay.weight == "dynamic":
            with torch.no_grad():
                _, replay_ce, kl = run(0.0, 0.0)
            weight = self.anti_forgetting_scale * self._weight(task_ce + replay_ce, kl)
        else:
            weight = self.anti_forgetting_scale * float(self.replay.weight)
        both, replay_ce, kl = run(self.replay_ce_weight, weight)
        return both, replay_ce, kl, weight

    def _weight(self, ce: torch.Tensor, term: torch.Tensor) -> float:
        if self.replay.weight != "dynamic":
            return float(self.replay.weight)
        return min(float(ce / term), self.replay.max_weight) if float(term) > 0 else 0.0

    def summarize(
        self,
        sums: dict[str, torch.Tensor | float],
        global_tokens: int,
        world: int,
        device: torch.device,
        replay_weight: float,
    ) -> dict[str, float]:
        """The step's logged parts (summed over ranks) and ``loss``, the objective as optimized.

        One all-reduce of a float64 vector on ``device`` (NCCL reduces device tensors only; none without a
        process group) and one read of it: the step's only device-to-host transfer of the loss parts.
        """
        names = ["task_ce", "kd", "replay_ce", self.replay.strategy]
        totals = torch.stack([torch.as_tensor(sums.get(n, 0.0), dtype=torch.float64, device=device) for n in names])
        if dist.is_initialized():
            dist.all_reduce(totals)
        task_ce, kd, replay_ce, term = totals.tolist()
        out = {"loss/task_ce": task_ce / global_tokens}
        loss = out["loss/task_ce"]
        if self.kd.weight > 0:
            out["loss/kd"] = kd / global_tokens
            loss += self.kd_weight * out["loss/kd"]
        if "replay_ce" in sums:
            out["loss/replay_ce"] = replay_ce / world
            loss += self.replay_ce_weight * out["loss/replay_ce"]
            if self.strategy_term:
                out[f"loss/{self.replay.strategy}"] = term / world
                out["replay_weight"] = replay_weight
                loss += replay_weight * out[f"loss/{self.replay.strategy}"]
        out["loss"] = loss
        return out
