"""GeRe cache on a tiny Llama and real replay text: thresholds, exact-zero TM, refusal, 1 vs 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from data_prep.build import SourceSpec
from data_prep.replay import ReplayShard, build_replay
from pipeline.gere.cache import CacheMismatch, GeReCache, build_cache, pad_replay_rows
from pipeline.launch import ROOT, launch_env, run_deepspeed
from pipeline.losses.tm_loss import tm_loss
from pipeline.runtime.model import ModelSource, final_hidden_states, load_causal_lm, model_fingerprint

TINY = {
    "vocab_size": 768,
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
REPLAY_LEN = 40


@pytest.fixture(scope="module")
def replay(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("replay")
    build_replay(
        SourceSpec(name="gen", role="general", paths=(str(sample.general),)),
        str(sample.tokenizer),
        out,
        num_samples=24,
        replay_len=REPLAY_LEN,
        seed=3,
        quiet=True,
    )
    return out


@pytest.fixture(scope="module")
def built(replay, tmp_path_factory):
    source = ModelSource(config=TINY, seed=1)
    model = load_causal_lm(source).eval()
    shard = ReplayShard.open(replay)
    rows, meta = shard.rows(), shard.meta
    out = build_cache(
        lambda i, m: final_hidden_states(model, i, m),
        rows["input_ids"],
        rows["id"],
        tmp_path_factory.mktemp("cache") / "c",
        hidden_size=TINY["hidden_size"],
        replay_len=REPLAY_LEN,
        batch_size=5,
        model_fingerprint=model_fingerprint(source),
        tokenizer_fingerprint=meta["tokenizer_fingerprint"],
        features=True,
    )
    return source, model, rows, meta, out


def open_cache(built) -> GeReCache:
    source, _, _, meta, out = built
    return GeReCache.open(out, model_fingerprint(source), meta["tokenizer_fingerprint"])


def test_thresholds_equal_a_float64_recomputation(built):
    _, model, rows, _, _ = built
    ids, mask = pad_replay_rows(rows["input_ids"], REPLAY_LEN)
    with torch.no_grad():
        h = final_hidden_states(model, ids, mask).double()
    real = h[mask.bool()]
    cache = open_cache(built)
    torch.testing.assert_close(cache.thresholds.mean, real.mean(0).float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cache.thresholds.std, real.std(0, unbiased=False).float(), rtol=1e-6, atol=1e-6)
    assert cache.meta["states_bytes"] * 16 == cache.meta["fp32_activation_bytes"]  # H = 48: whole bytes


@pytest.mark.parametrize("fused", [False, True])
def test_tm_is_exactly_zero_for_the_base_model_and_training_on_it_undoes_a_perturbation(built, fused):
    source, _, rows, _, _ = built
    cache = open_cache(built)
    model = load_causal_lm(source)
    index = list(range(8))
    ids, mask = pad_replay_rows([rows["input_ids"][i] for i in index], REPLAY_LEN)
    states = cache.states(index)
    neg, pos = cache.thresholds.neg, cache.thresholds.pos

    def tm() -> torch.Tensor:
        return tm_loss(final_hidden_states(model, ids, mask), states, neg, pos, mask, fused=fused)[0]

    loss = tm()
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.all(p.grad == 0) for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.zero_grad()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = tm()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0 and losses[-1] < 0.7 * losses[0], losses


def test_cache_is_refused_for_another_model_tokenizer_or_replay_shard(built, replay, sample, tmp_path):
    source, _, rows, meta, out = built
    other = ModelSource(config=TINY, seed=2)
    with pytest.raises(CacheMismatch, match="another model"):
        GeReCache.open(out, model_fingerprint(other), meta["tokenizer_fingerprint"])
    with pytest.raises(CacheMismatch, match="another tokenizer"):
        GeReCache.open(out, model_fingerprint(source), "0123456789abcdef")
    cache = GeReCache.open(out, model_fingerprint(source), meta["tokenizer_fingerprint"])
    cache.check_shard(ReplayShard.open(replay), rows)  # its own shard
    spec = SourceSpec(name="gen", role="general", paths=(str(sample.general),))
    for name, kwargs in (
        ("reseeded", {"replay_len": REPLAY_LEN, "seed": 4}),
        ("longer", {"replay_len": 48, "seed": 3}),
    ):
        build_replay(spec, str(sample.tokenizer), tmp_path / name, num_samples=24, quiet=True, **kwargs)
        other_shard = ReplayShard.open(tmp_path / name)
        with pytest.raises(CacheMismatch, match="built for another replay shard"):
            cache.check_shard(other_shard, other_shard.rows())


def test_two_zero3_ranks_under_the_launcher_build_the_same_cache_as_one_process(built, replay, tmp_path):
    """A saved safetensors checkpoint, so the ZeRO-3 path loads it partitioned (zero.Init)."""
    _, model, _, _, _ = built
    ckpt = tmp_path / "base"
    model.save_pretrained(str(ckpt), safe_serialization=True)
    args = ["--model", str(ckpt), "--replay", str(replay), "--batch-size", "5"]
    single = subprocess.run(
        [sys.executable, "-m", "pipeline.gere", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=launch_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    zero3 = ["--deepspeed", str(ROOT / "ds_configs" / "zero3_cpu.json"), "--out", str(tmp_path / "two")]
    multi = run_deepspeed("pipeline.gere", args + zero3, ranks=2, capture=True, timeout=600)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]
    # DeepSpeed's CPU all-reduce makes a 66 MB /dev/shm buffer per rank, named by the launch's port; each rank
    # removes its own at exit (other launches on the machine may hold theirs meanwhile)
    port = multi.args[multi.args.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    one, two = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    from safetensors.torch import load_file

    t1, t2 = (load_file(str(tmp_path / d / "thresholds.safetensors")) for d in ("one", "two"))
    torch.testing.assert_close(t1["mean"], t2["mean"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(t1["std"], t2["std"], rtol=1e-6, atol=1e-7)
    states = [np.fromfile(tmp_path / d / "states.u8", np.uint8) for d in ("one", "two")]
    assert np.array_equal(*states)
    assert one["ids"] == two["ids"] and one["model_fingerprint"] == two["model_fingerprint"]


def test_a_cache_built_otherwise_than_training_runs_is_named_in_what_differs():
    from pipeline.config import load_train_config
    from pipeline.gere.build import differs_from_training

    cfg = load_train_config(None, ["data.prep=p", "steps=1", "model.config={hidden_size: 8}", "model.dtype=bfloat16"])
    meta = {"built_with": {"dtype": "float32", "attn_implementation": "sdpa", "batch_size": 4}}
    assert differs_from_training(meta, cfg, world=4, layout=None) == [
        "dtype float32 (training: bfloat16)",
        "batch_size 4 (training: 1)",
    ]
    meta["built_with"].update(dtype="bfloat16", batch_size=1)
    assert differs_from_training(meta, cfg, world=4, layout=None) == []
