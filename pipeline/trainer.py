"""The training loop: resume, then step, log, checkpoint and evaluate until done.

One step = grad_accum micro-batches per rank of packed task rows (+ replay
rows). Task CE is a sum over tokens divided by the loss tokens of the whole
global batch (each rank counts its own rows; one scalar all-reduce), times the factor
DeepSpeed divides by (grad_accum × ranks): the gradient is the global token
mean however the batch is split. Replay rows get their own forward (each
document alone, padded to replay_len, as the GeRe cache saw them).
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_prep.tokenizer import load_tokenizer

from .checkpoint import CheckpointManager
from .config import TrainConfig, resolve_precision, to_dict
from .data import GlobalOrder, PrepPaths, packed_inputs
from .ds_config import filled_ds_config, inference_ds_config
from .evaluate import holdout_perplexities
from .gere.cache import GeReCache, pad_replay_rows
from .gere.sampler import ReplaySampler
from .isolation import check_document_isolation, forward_packed
from .losses.replay import ReplayInputs, ReplayLossConfig, causal_ce, combine, replay_terms
from .metrics import MetricsLogger, device_peak_flops, model_flops_utilization
from .model import ModelSource, hidden_size, load_causal_lm, model_fingerprint
from .penalty import AnchorPull, diagonal_fisher
from .precision import enable_tf32
from .schedule import lr_at, warmup_steps_for

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        import deepspeed

        resolve_precision(cfg)  # before anything reads model.dtype; the checkpoint records the concrete dtype
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.run_dir = Path(cfg.run_dir)
        self.prep = PrepPaths.read(cfg.data.prep)
        self.mixture = datasets.load_from_disk(str(self.prep.mixture))
        self.seq_len = self.prep.seq_len
        self.order = GlobalOrder(len(self.mixture), cfg.batch.micro_batch, cfg.batch.grad_accum, self.world, self.rank)
        self.total_steps = cfg.steps or math.ceil(cfg.tokens / (self.order.global_batch * self.seq_len))
        self.warmup = warmup_steps_for(self.total_steps, cfg.optim.warmup_steps, cfg.optim.warmup_ratio)
        self.tokenizer = load_tokenizer(self.prep.tokenizer)
        self.base_source = ModelSource(path=cfg.model.path, config=cfg.model.config or {}, seed=cfg.model.seed,
                                       dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
        start_source = ModelSource(path=cfg.init_from, dtype=cfg.model.dtype,
                                   trust_remote_code=cfg.model.trust_remote_code) if cfg.init_from else self.base_source
        enable_tf32()
        ds_cfg = filled_ds_config(cfg, self.world, hidden_size(start_source))
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep_last, self.rank,
                                             self.world)
        self.resume_from = self.checkpoints.resolve(cfg.checkpoint.resume)
        if self.resume_from and self.checkpoints.saved_world(*self.resume_from) != self.world:
            self.resume_from = self.checkpoints.to_universal(*self.resume_from)
            ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
        model = load_causal_lm(start_source, ds_cfg, cfg.model.attn_implementation)
        self._check_compatible(model.config)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = None if "optimizer" in ds_cfg else torch.optim.AdamW(
            params, lr=cfg.peak_lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay, fused=True)  # one pass, no full-size temporaries
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                               lr_scheduler=self._scheduler, config=ds_cfg)
        self.device = self.engine.device
        self.engine.eval()  # no dropout in the probe
        error = check_document_isolation(self.engine, cfg.model.attn_implementation, model.config.vocab_size,
                                         cfg.batch.micro_batch, getattr(torch, cfg.model.dtype), self.device)
        self.engine.train()
        log.info("document isolation: %s at micro_batch %d, packed vs alone logits differ by %.1g (relative)",
                 cfg.model.attn_implementation, cfg.batch.micro_batch, error)
        self.replay_cfg = ReplayLossConfig(cfg.replay.strategy, cfg.replay.weight, cfg.replay.kl_temperature,
                                           cfg.replay.fused_tm)
        self._setup_replay()
        self.teacher = self._teacher(ds_cfg) if cfg.kd.weight > 0 or cfg.replay.strategy == "kl" else None
        self.pull = self._penalty()
        self.step, self.tokens_seen = 0, 0
        self._resume()
        self.metrics = MetricsLogger(self.run_dir, self.rank, self.total_steps, self.step, cfg.log.tensorboard)
        self.holdout = {role: datasets.load_from_disk(str(p)) for role, p in self.prep.holdout.items()
                        if role in ("general", "domain")}
        self._stop = False
        self.peak_flops = device_peak_flops(cfg.log.peak_tflops)
        self.n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())

    # --- the loop -------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        # SLURM preemption signals every process of the job step and Ctrl-C the whole foreground process
        # group, so each rank sees the signal itself; ranks agree on the step to stop at (_should_stop).
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        last: dict[str, Any] = {}
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                last = self.train_step()
                self.step += 1
                self.tokens_seen += self.order.global_batch * self.seq_len
                last.update(tokens_seen=self.tokens_seen, epoch=self.order.epoch(self.step),
                            tok_s=self.order.global_batch * self.seq_len / (time.perf_counter() - started))
                if self.peak_flops:
                    last["mfu"] = model_flops_utilization(last["tok_s"] / self.world, self.n_params, self.peak_flops)
                if self.step % self.cfg.log.every == 0 or self.step == self.total_steps:
                    self.metrics.log(self.step, last)
                self.metrics.advance()
                if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step < self.total_steps:
                    self.metrics.log(self.step, self.evaluate())
                if self._should_stop():
                    log.warning("SIGTERM/SIGINT: saving a checkpoint at step %d and exiting", self.step)
                    self.save()
                    return last
                if self.cfg.checkpoint.every and self.step % self.cfg.checkpoint.every == 0:
                    self.save()
            if not (self.cfg.checkpoint.every and self.step % self.cfg.checkpoint.every == 0):
                self.save()
            final = self.evaluate()
            self.metrics.log(self.step, final)
            last.update(final)
            return last
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.metrics.close()

    def train_step(self) -> dict[str, Any]:
        cfg, engine = self.cfg, self.engine
        accum, scale = cfg.batch.grad_accum, cfg.batch.grad_accum * self.world
        # This rank's micro-batches are read before the first forward: their loss tokens, summed over ranks
        # in one scalar all-reduce, are what the global mean divides by (each rank reads only its own rows).
        micro = [{k: v.to(self.device) for k, v in packed_inputs(self.mixture[self.order.rows(self.step, j)]).items()}
                 for j in range(accum)]
        counted = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)], dtype=torch.float64,
                               device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(counted)
        global_tokens = max(int(counted.item()), 1)
        replay_chunks = self._replay_chunks()
        lr = engine.get_lr()[0]
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # task CE, KD, replay CE, replay term
        weight_used = 0.0
        for j, batch in enumerate(micro):
            logits = forward_packed(engine, batch["input_ids"], batch["position_ids"], cfg.model.attn_implementation)
            ce_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                                     ignore_index=-100, reduction="sum")
            loss = ce_sum / global_tokens * scale
            sums[0] += ce_sum.item()
            if cfg.kd.weight > 0:
                kd_sum = self._kd_sum(logits, batch, self.order.rows(self.step, j))
                loss = loss + cfg.kd.weight * kd_sum / global_tokens * scale
                sums[1] += kd_sum.item()
            if replay_chunks:
                terms = self._replay_terms(replay_chunks[j])
                _, weight_used = combine(self.replay_cfg, (ce_sum / global_tokens * scale).detach(), terms)
                loss = loss + terms["replay_ce"]
                sums[2] += terms["replay_ce"].item() / accum
                if self.replay_cfg.strategy in terms:
                    loss = loss + weight_used * terms[self.replay_cfg.strategy]
                    sums[3] += terms[self.replay_cfg.strategy].item() / accum
            engine.backward(loss)
            engine.step()
        if self.pull is not None:
            self.pull.apply(lr)
        dist.all_reduce(sums)
        out = {"loss/task_ce": sums[0].item() / global_tokens, "lr": lr,
               "grad_norm": float(engine.get_global_grad_norm() or 0.0)}
        if cfg.kd.weight > 0:
            out["loss/kd"] = sums[1].item() / global_tokens
        if replay_chunks:
            out["loss/replay_ce"] = sums[2].item() / self.world
            if self.replay_cfg.strategy not in ("ce", "none"):
                out[f"loss/{self.replay_cfg.strategy}"] = sums[3].item() / self.world
                out["replay_weight"] = weight_used
        strategy_term = out.get(f"loss/{self.replay_cfg.strategy}", 0.0) if replay_chunks else 0.0
        out["loss"] = (out["loss/task_ce"] + cfg.kd.weight * out.get("loss/kd", 0.0) + out.get("loss/replay_ce", 0.0)
                       + weight_used * strategy_term)  # the objective, as optimized
        return out

    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        try:
            return holdout_perplexities(lambda ids: self.engine(input_ids=ids, use_cache=False).logits, self.holdout,
                                        self.seq_len, self.cfg.eval.max_docs, self.device, whole_documents=False)
        finally:
            self.engine.train()

    def save(self) -> Path:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "global_batch": self.order.global_batch,
                 "world": self.world, "config": to_dict(self.cfg),
                 "replay_sampler": self.sampler.state_dict() if self.sampler else None}
        return self.checkpoints.save(self.engine, self.step, state)

    # --- pieces ---------------------------------------------------------------------------------------

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        peak, o = self.cfg.peak_lr, self.cfg.optim
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
            s, peak, self.total_steps, self.warmup, o.decay, o.min_lr_ratio) / peak)

    def _check_compatible(self, config: Any) -> None:
        if self.tokenizer.vocab_size > config.vocab_size:
            raise ValueError(f"tokenizer {self.prep.tokenizer} has {self.tokenizer.vocab_size} tokens, the model's "
                             f"vocabulary only {config.vocab_size}")
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and self.seq_len > limit:
            raise ValueError(f"data seq_len {self.seq_len} is above the model's max_position_embeddings {limit}")

    def _setup_replay(self) -> None:
        self.sampler = self.cache = self.replay_rows = None
        if self.replay_cfg.strategy == "none":
            return
        if self.prep.replay is None:
            raise ValueError(f"{self.cfg.data.prep}: no replay shard in prep.json; replay.strategy needs one")
        self.replay_rows = datasets.load_from_disk(str(self.prep.replay / "data"))
        slots = self.world * self.cfg.batch.grad_accum
        if self.cfg.replay.samples_per_step % slots:
            raise ValueError(f"replay.samples_per_step ({self.cfg.replay.samples_per_step}) must be a multiple of "
                             f"ranks × grad_accum ({slots})")
        self.sampler = ReplaySampler(len(self.replay_rows), self.cfg.replay.samples_per_step, self.cfg.seed)
        if self.replay_cfg.strategy in ("tm", "l1", "l2"):
            self.cache = GeReCache.open(self.cfg.replay.cache, model_fingerprint(self.base_source),
                                        self.tokenizer.fingerprint, device=self.device)
            if self.cfg.model.dtype != "float32":  # pipeline.gere builds in fp32 on one device
                log.warning("replay: the GeRe cache holds fp32 activations and this run trains in %s, so the "
                            "replay term starts slightly above 0 (a few states sit at a threshold)",
                            self.cfg.model.dtype)
            if self.cache.meta["num_samples"] != len(self.replay_rows):
                raise ValueError(f"{self.cfg.replay.cache}: built for {self.cache.meta['num_samples']} replay samples, "
                                 f"the shard has {len(self.replay_rows)}")
        self.replay_len = json.loads((self.prep.replay / "replay.json").read_text())["replay_len"]

    def _replay_chunks(self) -> list[list[int]]:
        """This rank's replay samples for each micro-batch of the step (empty when replay is off)."""
        if self.sampler is None:
            return []
        drawn = self.sampler.next_indices()
        per = len(drawn) // (self.world * self.cfg.batch.grad_accum)
        return [drawn[(j * self.world + self.rank) * per:(j * self.world + self.rank + 1) * per]
                for j in range(self.cfg.batch.grad_accum)]

    def _replay_terms(self, index: list[int]) -> dict[str, torch.Tensor]:
        ids, mask = pad_replay_rows(self.replay_rows[index]["input_ids"], self.replay_len)
        ids, mask = ids.to(self.device), mask.to(self.device)
        inputs = ReplayInputs(ids, mask)
        if self.cache is not None:
            inputs.states = self.cache.states(index, self.device)
            inputs.neg, inputs.pos = self.cache.thresholds.neg, self.cache.thresholds.pos
            if self.replay_cfg.strategy in ("l1", "l2"):
                inputs.features = self.cache.features(index, self.device)
        if self.teacher is not None and self.replay_cfg.strategy == "kl":
            with torch.no_grad():
                inputs.teacher_logits = self.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = self.engine(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        return replay_terms(self.replay_cfg, out.logits, out.hidden_states[-1], inputs)

    def _kd_sum(self, logits: torch.Tensor, batch: dict[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
        """Sum over loss tokens of KL(teacher || student) at temperature T, scaled by T²."""
        with torch.no_grad():
            teacher = forward_packed(self.teacher, batch["input_ids"], batch["position_ids"],
                                     self.cfg.model.attn_implementation)
        t = self.cfg.kd.temperature
        mask = batch["labels"][:, 1:] != -100
        if self.cfg.kd.rows == "general":
            general = torch.tensor([r == "general" for r in self.mixture[rows]["role"]], device=mask.device)
            mask = mask & general[:, None]
        s = F.log_softmax(logits[:, :-1].float() / t, -1)
        q = F.log_softmax(teacher[:, :-1].float() / t, -1)
        return ((q.exp() * (q - s)).sum(-1) * mask).sum() * t * t

    def _teacher(self, ds_cfg: dict[str, Any]) -> Any:
        import deepspeed

        model = load_causal_lm(self.base_source, inference_ds_config(ds_cfg), self.cfg.model.attn_implementation)
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=inference_ds_config(ds_cfg))
        engine.eval()
        return engine

    def _resume(self) -> None:
        if self.resume_from is None:
            return
        state = self.checkpoints.load(self.engine, *self.resume_from)
        if state["global_batch"] != self.order.global_batch:
            raise ValueError(f"checkpoint has global batch {state['global_batch']} rows, this run "
                             f"{self.order.global_batch}: the data order would change")
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        if self.sampler is not None and state.get("replay_sampler"):
            self.sampler.load_state_dict(state["replay_sampler"])
        # L2-SP anchors were taken from the start weights before this load: still the run's initial weights.

    def _penalty(self) -> AnchorPull | None:
        """Anchors are the start weights, taken before any checkpoint is loaded (so also on resume)."""
        kind, params = self.cfg.penalty.kind, list(self.engine.module.parameters())
        if kind == "none":
            return None
        if kind == "l2sp":
            return AnchorPull(params, self.cfg.penalty.weight)
        if self.prep.replay is None:
            raise ValueError("penalty.kind 'ewc' estimates its Fisher on the replay shard; prep.json has none")
        rows = datasets.load_from_disk(str(self.prep.replay / "data"))
        replay_len = json.loads((self.prep.replay / "replay.json").read_text())["replay_len"]
        per = self.cfg.batch.micro_batch

        def batches():
            for b in range(self.cfg.penalty.ewc_batches):
                start = ((b * self.world + self.rank) * per) % len(rows)
                ids, mask = pad_replay_rows(rows[start:start + per]["input_ids"], replay_len)
                yield ids.to(self.device), mask.to(self.device)

        def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            ids, mask = batch
            return causal_ce(self.engine(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)

        fisher = diagonal_fisher(self.engine, params, batches(), loss)
        peak = max(float(f.max()) for f in fisher if f.numel())
        log.info("EWC: diagonal Fisher from %d replay batches; largest importance %.1fx the mean",
                 self.cfg.penalty.ewc_batches, peak)
        return AnchorPull(params, self.cfg.penalty.weight, fisher)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop = True

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step, or the save hangs
        return bool(flag.item())
