"""Replay samples packed behind the task rows in one forward (``replay.forward: joint``, pipeline/gere/joint.py).

Training-level checks ride on runs the suite already makes: the 2-rank TM run of
tests/test_train.py builds its cache in the joint layout and needs TM exactly 0 at
step 1, and the chunked-head test compares a joint run (chunked head loss) with a
separate one (full logits) step by step.
"""

from __future__ import annotations

import pytest
import torch

from cpt_core.errors import ConfigError
from pipeline.config import load_train_config
from pipeline.gere.build import differs_from_training
from pipeline.gere.joint import ReplayLayout, filler_task_rows, joint_hidden, replay_layout
from pipeline.losses.head import HeadLoss, final_hidden, frozen_head_weight
from pipeline.losses.replay import ReplayInputs, kl_from_hidden
from pipeline.runtime.model import ModelSource, final_hidden_states, load_causal_lm
from tests.train_helpers import TINY_LLAMA


def padded(lengths: list[int], replay_len: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros((len(lengths), replay_len), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def test_pack_gives_each_sample_its_own_slot_and_unpack_returns_it():
    layout = ReplayLayout(replay_len=3, seq_len=8)  # 2 slots a row, a tail of 2
    ids = torch.tensor([[11, 12, 0], [21, 22, 23], [31, 0, 0]])
    packed, positions = layout.pack(ids)
    assert packed.tolist() == [[11, 12, 0, 21, 22, 23, 0, 0], [31, 0, 0, 0, 0, 0, 0, 0]]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 2, 0, 1]] * 2  # every slot and the tail start a document
    hidden = packed.unsqueeze(-1).float().expand(-1, -1, 4)  # a "hidden state" that is the token id
    assert torch.equal(layout.unpack(hidden, 3)[..., 0].long(), ids)


@pytest.mark.parametrize("replay_len", [64, 48, 128])  # several slots a row, a tail, one slot a row
def test_replay_states_from_the_joint_forward_equal_their_own_padded_forward_bit_for_bit(replay_len):
    """What makes TM 0 at step 1 with a cache built either way on CPU: the samples' final states do not depend
    on the task rows beside them, on the slot they sit in, nor on being packed rather than padded with a mask."""
    model = load_causal_lm(ModelSource(config=TINY_LLAMA, seed=0)).eval()
    vocab, seq_len = TINY_LLAMA["vocab_size"], 128
    layout = ReplayLayout(replay_len, seq_len)
    replay, mask = padded([replay_len, 5, replay_len // 2], replay_len, vocab)
    task = torch.randint(4, vocab, (2, seq_len), generator=torch.Generator().manual_seed(1))
    task_positions = torch.cat([torch.arange(40), torch.arange(seq_len - 40)]).expand(2, -1)
    whole = torch.arange(seq_len).expand(2, -1)  # task rows that are each one document: no restart in them
    reordered = [2, 0, 1]  # the cache sees samples in other slots than training does
    with torch.no_grad():
        alone = final_hidden_states(model, replay, mask)
        task_hidden, joint = joint_hidden(model, task, task_positions, replay, layout, "sdpa")
        _, beside_whole = joint_hidden(model, task, whole, replay, layout, "sdpa")
        filler, filler_positions = filler_task_rows(2, seq_len, "cpu")
        _, built = joint_hidden(model, filler, filler_positions, replay[reordered], layout, "sdpa")
    real = mask.bool()
    assert torch.equal(joint[real], alone[real])
    assert torch.equal(beside_whole[real], alone[real])
    assert torch.equal(built[real[reordered]], joint[reordered][real[reordered]])  # as pipeline.gere builds it
    assert task_hidden.shape == (2, seq_len, TINY_LLAMA["hidden_size"])


def test_with_several_long_slots_a_row_the_joint_states_move_with_the_slot_by_rounding_only():
    """4 slots of 128 tokens in rows of 512: on CPU sdpa a sample's states then depend on its slot by fp32
    rounding (measured up to 7e-7 on this model, 1.7e-6 at bench/joint_kl_floor.py's tiny shape; the rows of
    128 above are bitwise). What the cache and the teacher may differ by, so TM and KL start at 0 up to
    rounding. The bound is 50x that error, and far under what a packing bug gives: a sample unpacked one token
    off, or packed without document isolation, differs by 1.3 and 0.8 of the states' largest value."""
    model = load_causal_lm(ModelSource(config=TINY_LLAMA, seed=0)).eval()
    vocab, seq_len, replay_len = TINY_LLAMA["vocab_size"], 512, 128
    layout = ReplayLayout(replay_len, seq_len)
    replay, mask = padded([replay_len, 100, replay_len // 2, replay_len], replay_len, vocab)
    task = torch.randint(4, vocab, (2, seq_len), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(40), torch.arange(seq_len - 40)]).expand(2, -1)
    reordered = [3, 2, 1, 0]
    with torch.no_grad():
        alone = final_hidden_states(model, replay, mask)
        _, joint = joint_hidden(model, task, positions, replay, layout, "sdpa")
        filler, filler_positions = filler_task_rows(2, seq_len, "cpu")
        _, built = joint_hidden(model, filler, filler_positions, replay[reordered], layout, "sdpa")
    real = mask.bool()
    scale = alone[real].abs().max()
    assert (joint[real] - alone[real]).abs().max() <= 1e-5 * scale
    assert (built[real[reordered]] - joint[reordered][real[reordered]]).abs().max() <= 1e-5 * scale


def layout_for(
    *overrides: str, replay_len: int = 64, seq_len: int = 128, world: int = 1, head: bool = True, device: str = "cpu"
) -> ReplayLayout | None:
    cfg = load_train_config(None, ["data.prep=p", "steps=1", "model.config={hidden_size: 8}", *overrides])
    return replay_layout(cfg, replay_len, seq_len, world, head, device)


@pytest.mark.parametrize("replay_len", [48, 128])  # several slots a row and a tail; one slot a row
def test_replay_kl_from_the_joint_forward_against_the_teachers_padded_forward_is_exactly_0_at_the_start(replay_len):
    """replay.forward joint with kl on CPU: the teacher (a frozen copy of the base) scores the samples padded, as
    pipeline.gere.feed does, and the student's packed states are compared with its through the head loss. At the
    start they are the same model, so KL and its gradient are exactly 0; a sample read from another slot is not."""
    model = load_causal_lm(ModelSource(config=TINY_LLAMA, seed=0))
    teacher = load_causal_lm(ModelSource(config=TINY_LLAMA, seed=0)).eval()
    vocab, seq_len = TINY_LLAMA["vocab_size"], 128
    layout = ReplayLayout(replay_len, seq_len)
    replay, mask = padded([replay_len, 5, replay_len // 2], replay_len, vocab)
    task = torch.randint(4, vocab, (2, seq_len), generator=torch.Generator().manual_seed(1))
    task_positions = torch.cat([torch.arange(40), torch.arange(seq_len - 40)]).expand(2, -1)
    with torch.no_grad():
        inputs = ReplayInputs(replay, mask, teacher_hidden=final_hidden(teacher, input_ids=replay, attention_mask=mask))
    _, student = joint_hidden(model, task, task_positions, replay, layout, "sdpa")
    head = HeadLoss(model)

    def kl_of(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (weighted, differentiable; KL)
        loss, _, kl = kl_from_hidden(head, hidden, inputs, frozen_head_weight(teacher), 1.0, 0.0, 1.0)
        return loss, kl

    loss, kl = kl_of(student)
    loss.backward()
    assert kl.item() == 0.0 and loss.item() == 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters())) and not any(g.any() for g in grads)
    assert kl_of(student[[1, 0, 2]].detach())[1].item() > 1e-3  # samples' states read from each other's slots


def test_auto_packs_the_samples_where_that_is_exact_and_wastes_little_and_joint_refuses_what_cannot_work():
    tm = ["replay.strategy=tm", "replay.cache=c", "replay.samples_per_step=4"]  # 4 samples: 2 full rows
    assert layout_for(*tm) == ReplayLayout(64, 128)
    assert layout_for(*tm, "replay.forward=separate") is None
    assert layout_for() is None  # no replay
    assert layout_for(*tm, device="cuda") is None  # sdpa on CUDA: a sample's states may depend on its slot
    assert layout_for(*tm, "model.attn_implementation=flash_attention_2", device="cuda") == ReplayLayout(64, 128)
    assert layout_for(*tm, world=4) is None  # 1 sample a forward in a row of 2 slots: half the row empty
    assert layout_for(*tm, world=4, replay_len=128) == ReplayLayout(128, 128)  # one slot a row, full
    for soft in ({"world": 4}, {"device": "cuda"}):  # asked for, it applies, with a warning
        assert layout_for(*tm, "replay.forward=joint", **soft) == ReplayLayout(64, 128)
    # kl: the teacher scores the samples in their own padded forward, which the joint states equal on CPU, bitwise
    # or to rounding; on a GPU that floor is unmeasured, so auto keeps them apart there, even with flash attention
    kl = ["replay.strategy=kl", "replay.samples_per_step=4"]
    assert layout_for(*kl) == ReplayLayout(64, 128)
    assert layout_for(*kl, "model.attn_implementation=flash_attention_2", device="cuda") is None
    assert layout_for(*kl, "replay.forward=joint", device="cuda") == ReplayLayout(64, 128)
    for hard in ({"replay_len": 256}, {"head": False}):  # longer than a task row; a loss from full logits
        assert layout_for(*tm, **hard) is None
        with pytest.raises(ConfigError, match="replay.forward joint cannot apply"):
            layout_for(*tm, "replay.forward=joint", **hard)
    with pytest.raises(ConfigError, match="replay.forward joint cannot apply"):
        layout_for(*kl, "replay.forward=joint", head=False)


def test_a_cache_built_in_the_other_layout_is_named_in_what_differs():
    cfg = load_train_config(
        None, ["data.prep=p", "steps=1", "model.config={hidden_size: 8}", "model.dtype=float32", "batch.micro_batch=2"]
    )
    old = {"built_with": {"dtype": "float32", "attn_implementation": "sdpa", "batch_size": 1}}  # no layout recorded
    joint = ReplayLayout(64, 128)
    assert differs_from_training(old, cfg, world=4, layout=None) == []
    assert differs_from_training(old, cfg, world=4, layout=joint) == [
        "layout separate (training: joint)",
        "task_rows None (training: 2)",
        "seq_len None (training: 128)",
    ]
    built_joint = {"built_with": {**old["built_with"], "layout": "joint", "task_rows": 2, "seq_len": 128}}
    assert differs_from_training(built_joint, cfg, world=4, layout=joint) == []
    assert differs_from_training(built_joint, cfg, world=4, layout=None) == ["layout joint (training: separate)"]
    assert differs_from_training(built_joint, cfg, world=4, layout=ReplayLayout(64, 256)) == [
        "seq_len 128 (training: 256)"  # the same replay shard, a prep with longer task rows
    ]
