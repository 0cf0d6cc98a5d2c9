"""The replay side of a training step: which replay rows each micro-batch gets, and what comes with them.

Built from the training config: the replay shard named by the prep, the
sampler (seeded, resumable), and for the cached strategies the GeRe cache,
checked against the base model and the prep's tokenizer. Each step draws
``replay.samples_per_step`` samples and spreads them over the ranks and, when
there are fewer than ranks × grad_accum, over a subset of the micro-batches
(the same ones on every rank: a replay forward under ZeRO-3 gathers parameters
collectively, so every rank must run it), either in their own forward or packed
behind the task rows in theirs (``replay.forward``, ``joint.py``). Any count
works on any number of ranks: rows the samples do not fill pad the forward and
weigh 0, and each chunk's terms are weighted by its share of the samples
(``ReplayChunk.share``), so the gradient is the mean over the step's samples.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cpt_core.errors import UserError
from data_prep.prep_dir import PrepIndex
from data_prep.replay import ReplayShard

from ..config import CACHED_STRATEGIES, TrainConfig
from ..losses.head import final_hidden
from ..losses.replay import ReplayInputs
from ..runtime.model import ModelSource, model_fingerprint
from .build import built_in_own_forward, differs_from_training
from .cache import GeReCache, pad_replay_rows
from .joint import ReplayLayout, replay_layout
from .sampler import ReplayChunk, ReplaySampler, replay_slots

log = logging.getLogger(__name__)


class ReplayFeed:
    def __init__(
        self,
        cfg: TrainConfig,
        shard: ReplayShard,
        cache: GeReCache | None,
        world: int,
        rank: int,
        layout: ReplayLayout | None = None,
        head_loss: bool = False,
    ) -> None:
        """``head_loss``: the trained model's loss runs from hidden states, so the ``kl`` strategy's teacher gives
        its final hidden states, not logits."""
        self.head_loss = head_loss
        self.strategy, self.grad_accum, self.world, self.rank = cfg.replay.strategy, cfg.batch.grad_accum, world, rank
        self.shard, self.cache, self.replay_len = shard, cache, shard.replay_len
        self.layout = layout  # None: the replay rows get their own forward
        self.rows = shard.rows()
        self.sampler = ReplaySampler(len(self.rows), cfg.replay.samples_per_step, cfg.seed)
        if cache is not None:
            cache.check_shard(shard, self.rows)

    @classmethod
    def from_config(
        cls,
        cfg: TrainConfig,
        prep: PrepIndex,
        base: ModelSource,
        tokenizer_fingerprint: str,
        world: int,
        rank: int,
        device: torch.device,
        head_loss: bool,
    ) -> ReplayFeed | None:
        """None when ``replay.strategy`` is none. ``head_loss``: the trained model's loss runs from hidden
        states, which the joint layout needs."""
        if cfg.replay.strategy == "none":
            return None
        if prep.replay is None:
            raise UserError(f"{cfg.data.prep}: no replay shard in prep.json; replay.strategy needs one")
        shard = ReplayShard.open(prep.replay)
        layout = replay_layout(cfg, shard.replay_len, prep.seq_len, world, head_loss, device.type)
        cache = None
        if cfg.replay.strategy in CACHED_STRATEGIES:
            cache = GeReCache.open(cfg.replay.cache, model_fingerprint(base), tokenizer_fingerprint, device=device)
            if layout is not None and cfg.replay.forward == "auto" and built_in_own_forward(cache.meta):
                # A cache from before the joint layout, or built without --config: follow it, so TM starts at 0.
                log.info(
                    "replay: samples in their own forward, as the GeRe cache was built; rebuild it with "
                    "`python -m pipeline.gere --config <this config>` to run them in the task rows' forward"
                )
                layout = None
            differences = differs_from_training(cache.meta, cfg, world, layout)
            if differences:
                log.warning(
                    "replay: the GeRe cache was built with %s, so the replay term may start slightly above 0; "
                    "build it as this run trains with `python -m pipeline.gere --config <this config>`",
                    ", ".join(differences),
                )
        if layout is not None:
            log.info(
                "replay: samples in the task rows' forward, %d a packed row of %d tokens", layout.slots, prep.seq_len
            )
        return cls(cfg, shard, cache, world, rank, layout, head_loss)

    def step_chunks(self) -> list[ReplayChunk | None]:
        """Draw the next step's samples; returns this rank's rows for each micro-batch (None: no replay)."""
        return replay_slots(self.sampler.next_indices(), self.world, self.grad_accum, self.rank)

    def inputs(self, chunk: ReplayChunk, device: torch.device, teacher: Any = None) -> ReplayInputs:
        """Padded rows and what the strategy compares against: cached states/features, or the teacher's outputs
        (its final hidden states where the loss runs from hidden states: no ``[R, L, V]`` logits)."""
        index = chunk.rows
        ids, mask = pad_replay_rows(self.rows[index]["input_ids"], self.replay_len)
        inputs = ReplayInputs(ids, mask, real=chunk.real)
        inputs.token_counts()  # counted on the host: the step reads nothing back from the device for them
        ids, mask = inputs.input_ids, inputs.attention_mask = ids.to(device), mask.to(device)
        if self.cache is not None:
            inputs.states = self.cache.states(index, device)
            inputs.neg, inputs.pos = self.cache.thresholds.neg, self.cache.thresholds.pos
            if self.strategy in ("l1", "l2"):
                inputs.features = self.cache.features(index, device)
        if self.strategy == "kl":
            with torch.no_grad():
                if self.head_loss:
                    inputs.teacher_hidden = final_hidden(teacher, input_ids=ids, attention_mask=mask)
                else:
                    inputs.teacher_logits = teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return inputs

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)
