"""pipeline.train for real: 2 CPU ranks under the deepspeed launcher, ZeRO-3, a tiny Llama, stdlib text."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_prep.replay import ReplayShard
from pipeline.checkpoint.files import COMPLETE, CheckpointDir, checkpoint_root, verify_checkpoint
from pipeline.config import load_train_config
from pipeline.launch import run_deepspeed
from pipeline.runtime.model import ModelSource, load_causal_lm
from pipeline.training.schedule import lr_at

from .train_helpers import (
    ROOT,
    TINY_LLAMA,
    digest,
    env,
    export_checkpoint,
    final_weights,
    latest_checkpoint,
    metrics,
    run_training,
    start_training,
    write_config,
)


def test_cpt_loss_goes_down(reference):
    m = metrics(reference[1])
    assert sorted(m) == list(range(1, 13))
    first, last = m[1]["loss"], (m[11]["loss"] + m[12]["loss"]) / 2
    assert last < first - 0.3, (first, last)
    assert m[12]["ppl/general"] > 0 and m[12]["ppl/domain"] > 0


GOLDEN = Path(__file__).resolve().parent / "golden" / "reference_losses.json"
GOLDEN_KEYS = ("loss", "loss/task_ce", "grad_norm", "ppl/general", "ppl/domain")


def test_reference_run_reproduces_the_golden_losses(reference):
    """Every logged loss of the 2-rank reference run, pinned: a change to the objective or its normalisation fails.

    After an intended change: CPT_UPDATE_GOLDEN=1 python -m pytest tests/test_train.py -k golden
    """
    m = metrics(reference[1])
    got = {str(step): {k: row[k] for k in GOLDEN_KEYS if k in row} for step, row in sorted(m.items())}
    if os.environ.get("CPT_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(
            json.dumps(
                {"run": "tests/conftest.py::reference (12 steps, 2 ZeRO-3 CPU ranks, fp32)", "losses": got},
                indent=1,
                sort_keys=True,
            )
            + "\n"
        )
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert got.keys() == golden.keys()
    for step, row in golden.items():
        for key, value in row.items():
            # fp32 on CPU: 1e-5 leaves room for another CPU's summation order (an AVX-512/AMX Xeon's GEMMs moved
            # the losses by <= 1.2e-6). The gradient norm moves more (2.9e-5 at step 9 there): it is a norm of
            # per-parameter sums that the kernels order differently, so it gets 1e-4.
            rel = 1e-4 if key == "grad_norm" else 1e-5
            assert got[step][key] == pytest.approx(value, rel=rel), (step, key)


def test_a_batch_log_shows_one_progress_line_per_logged_step_from_rank_0_only(reference):
    config, _ = reference
    text = (config.parent / "launcher.log").read_text()
    lines = [line for line in text.splitlines() if re.search(r"step \d+/12 \| tokens", line)]
    assert [int(re.search(r"step (\d+)/", line).group(1)) for line in lines] == list(range(1, 13))
    for part in ("loss ", "(task_ce ", "lr ", "grad ", " tok/s", "mem ", "eta "):
        assert part in lines[0], (part, lines[0])


def test_lr_follows_the_schedule_exactly(reference):
    config, run = reference
    cfg = load_train_config(config)
    m = metrics(run)
    for step, row in m.items():
        expected = lr_at(step - 1, cfg.peak_lr, 12, cfg.optim.warmup_steps, cfg.optim.decay, cfg.optim.min_lr_ratio)
        assert row["lr"] == pytest.approx(expected, rel=1e-12, abs=0), step


@pytest.mark.reliability("faults: training kills")
def test_kill_9_mid_run_then_resume_gives_the_same_losses_and_weights(reference, prep, tmp_path, lost):
    _, ref_run = reference
    run = tmp_path / "run"
    config = write_config(tmp_path / "cpt.yaml", prep, run)
    proc = start_training(config)
    marker = CheckpointDir.for_step(checkpoint_root(run), 4).path / COMPLETE
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not CheckpointDir.for_step(checkpoint_root(run), 12).path.exists()  # killed mid-run
    run_training(config)  # resume: auto
    ref, got = metrics(ref_run), metrics(run)
    assert [got[s]["loss"] for s in range(5, 13)] == [ref[s]["loss"] for s in range(5, 13)]  # bitwise
    a, b = final_weights(ref_run), final_weights(run)
    assert lost(sum(not torch.equal(a[k], b.get(k, torch.empty(0))) for k in a)) == 0 and a.keys() == b.keys()


def test_export_round_trip_gives_the_engines_logits_and_loads_with_transformers_alone(reference, sample, tmp_path):
    _, run = reference
    checkpoint = latest_checkpoint(run)
    result = export_checkpoint(checkpoint, str(tmp_path / "hf"), "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max_abs_logit_diff=0" in result.stdout
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    weights = final_weights(run)
    assert torch.equal(model.state_dict()["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
    assert (tmp_path / "hf" / "tokenizer.model").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    # Where only torch and transformers are installed (sentencepiece and protobuf refused on import), the
    # export loads through AutoTokenizer and AutoModelForCausalLM, reads the training tokens back as the text,
    # and encodes as the training tokenizer does; where it does not, the Viterbi searches broke a tie between
    # equal-score segmentations (a long run of one character) and the pieces still decode to the same text.
    from data_prep.tokenizer import load_tokenizer

    texts = sample.texts("domain")[:40] + sample.texts("general")[:40]
    training = load_tokenizer(sample.tokenizer).encode_batch(texts)
    script = (
        "import sys, json, importlib.machinery as m\n"
        "found = m.PathFinder.find_spec\n"  # as if sentencepiece and protobuf were not installed
        "m.PathFinder.find_spec = staticmethod(\n"
        "    lambda name, path=None, target=None: None\n"
        "    if name.split('.')[0] in ('sentencepiece', 'google') else found(name, path, target))\n"
        "from transformers import AutoTokenizer, AutoModelForCausalLM\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "texts, ids = json.loads(sys.stdin.read())\n"
        "ours = [tok(t, add_special_tokens=False)['input_ids'] for t in texts]\n"
        "print(json.dumps([ours, [tok.decode(i) for i in ids], [tok.decode(i) for i in ours]]))\n"
        "assert 'sentencepiece' not in sys.modules and 'google.protobuf' not in sys.modules\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "hf")],
        input=json.dumps([texts, training]),
        capture_output=True,
        text=True,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    ours, decoded, round_trip = json.loads(loaded.stdout.splitlines()[-1])
    assert decoded == texts and round_trip == texts
    assert sum(a == b for a, b in zip(ours, training)) >= 0.9 * len(texts)


def test_a_sharded_export_streams_the_checkpoints_own_weights(reference, tmp_path):
    """Small shards: several files and an index, each tensor the checkpoint's, loading as one model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from pipeline.export import export

    checkpoint = latest_checkpoint(reference[1])
    export(checkpoint, tmp_path / "hf", max_shard_size="100KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    full = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    written = {k: v for shard in shards for k, v in load_file(str(shard)).items()}
    assert written.keys() == full.keys() and all(torch.equal(written[k], full[k]) for k in full)  # fp32 run
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert all(torch.equal(v, full[k]) for k, v in loaded.state_dict().items())


@pytest.mark.reliability("checkpoints")
def test_an_export_that_fails_verification_leaves_no_directory(reference, tmp_path, monkeypatch, lost):
    import pipeline.export as export_module
    from pipeline.export import checkpoint_tensors

    _, run = reference
    checkpoint = latest_checkpoint(run)
    monkeypatch.setattr(
        export_module, "verify_export", lambda checkpoint, exported: (0.5, 10.0)
    )  # as a wrong export would
    with pytest.raises(export_module.ExportMismatch, match="differ from the checkpoint's engine by 0.5"):
        export_module.export(checkpoint, tmp_path / "hf", verify=True)
    assert lost(len(list(tmp_path.iterdir()))) == 0  # neither the export nor its temporary is left


def test_verify_of_a_large_model_compares_the_named_checkpoints_tensors_without_an_engine(
    reference, tmp_path, monkeypatch
):
    """Above VERIFY_ENGINE_MAX_PARAMS (forced to 0 here) --verify reads one tensor at a time from the checkpoint
    it was given, not from `latest`: an older checkpoint's export verifies, a changed tensor does not."""
    from safetensors.torch import load_file, save_file

    import pipeline.export as export_module
    from pipeline.export import checkpoint_tensors

    _, run = reference
    older = CheckpointDir.for_step(checkpoint_root(run), 6).path  # latest is step 12, whose weights differ
    monkeypatch.setattr(export_module, "VERIFY_ENGINE_MAX_PARAMS", 0)
    monkeypatch.setattr(export_module, "_verify_logits", lambda *a: pytest.fail("built an engine"))
    assert export_module.export(older, tmp_path / "hf", verify=True) == 0.0
    latest = latest_checkpoint(run)
    assert export_module.verify_tensors(checkpoint_tensors(latest), latest, tmp_path / "hf", torch.float32) > 0
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    changed = export_module.verify_tensors(checkpoint_tensors(older), older, tmp_path / "hf", torch.float32)
    assert changed == pytest.approx(1e-3, rel=1e-2)


@pytest.mark.reliability("security")
def test_l2sp_and_tm_replay_and_a_run_writes_only_inside_its_run_directory(reference, prep, tmp_path, lost):
    base = load_causal_lm(ModelSource(config=TINY_LLAMA, seed=0))
    config = write_config(
        tmp_path / "gere.yaml",
        prep,
        tmp_path / "run",
        penalty={"kind": "l2sp", "weight": 200.0},
        batch={"micro_batch": 1, "grad_accum": 2},  # the reference's global batch; replay in 1 of 2 micro-batches
        # joint: auto would keep 1 sample a forward in its own (half of a packed row of 64 tokens would be empty)
        replay={"strategy": "tm", "cache": str(tmp_path / "cache"), "samples_per_step": 2, "forward": "joint"},
    )
    built = run_deepspeed("pipeline.gere", ["--config", str(config)], ranks=2, capture=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]  # the cache as the run trains: 2 ZeRO-3 ranks, 1 row each
    inputs = {**digest(prep), **{f"tmp/{k}": v for k, v in digest(tmp_path).items()}}
    trained = run_training(config)
    assert "GeRe cache was built with" not in trained.stdout + trained.stderr  # nothing differs from training
    assert "replay: samples in the task rows' forward" in trained.stdout + trained.stderr  # the joint layout
    after = {**digest(prep), **{f"tmp/{k}": v for k, v in digest(tmp_path).items() if not k.startswith("run/")}}
    assert lost(len(set(inputs.items()) ^ set(after.items()))) == 0  # prep, cache, config: read, never written
    m = metrics(tmp_path / "run")
    assert m[1]["loss/tm"] == 0.0 and max(m[s]["loss/tm"] for s in m) > 0
    initial = {k: v.float() for k, v in base.state_dict().items()}

    def distance(weights):
        return sum(((weights[k].detach() - initial[k]) ** 2).sum().item() for k in weights)

    assert distance(final_weights(tmp_path / "run")) < 0.5 * distance(final_weights(reference[1]))


def test_chunked_head_loss_gives_the_full_logits_losses_on_two_zero3_ranks(prep, tmp_path):
    """KD on general rows + replay CE, 2 ZeRO-3 ranks: the head weight, an external parameter of the head loss,
    is gathered for its forward and backward, so every logged loss and the gradient norm match the full logits.
    The chunked run packs its replay samples behind the task rows (replay.forward joint), the full-logits run
    gives them their own forward (auto: no head loss): the two layouts give the same losses too."""
    runs, logs = {}, {}
    for chunked in (True, False):
        config = write_config(
            tmp_path / f"{chunked}.yaml",
            prep,
            tmp_path / f"run-{chunked}",
            steps=4,
            model={"chunked_loss": chunked},
            kd={"weight": 0.5, "rows": "general"},
            replay={"strategy": "ce", "samples_per_step": 2, "forward": "joint" if chunked else "auto"},
            checkpoint={"every": 0},
        )
        trained = run_training(config)
        logs[chunked] = trained.stdout + trained.stderr
        runs[chunked] = metrics(tmp_path / f"run-{chunked}")
    assert "replay: samples in the task rows' forward" in logs[True]
    assert "replay rows in their own forward: the model's loss runs from full logits" in logs[False]
    keys = ("loss", "loss/task_ce", "loss/kd", "loss/replay_ce", "grad_norm")
    for step in range(1, 5):
        for key in keys:  # abs: KD (~4e-4 nats) is a difference of near-equal sums; fp32 GEMMs differ at ~1e-8
            assert runs[True][step][key] == pytest.approx(runs[False][step][key], rel=1e-5, abs=1e-7), (step, key)
    assert max(runs[True][step]["loss/kd"] for step in range(1, 5)) > 0  # some steps carry general rows


def test_replay_kl_is_zero_at_step_one_is_the_only_replay_term_and_matches_full_logits_fixed_or_dynamic(prep, tmp_path):
    """Replay KL (weight 1.5, no replay CE) on 2 ZeRO-3 ranks: the
    frozen teacher is a second partitioned copy of the base, so at step 1 student and teacher are the same
    model and KL is 0; it grows as the model drifts, and the step's loss is task CE + 1.5 · KL, replay CE
    logged but not trained on.

    The run goes through the head loss (the teacher's final hidden states, its head weight gathered once), its
    replay samples packed behind the task rows (replay.forward joint): KL is exactly 0 at step 1 only if their
    states there are the teacher's padded forward's bit for bit. From its step-2 checkpoint, where student and
    teacher differ, a full-logits run with the samples in their own forward takes step 3 from the same
    weights: every logged loss and the gradient norm agree. (Not compared from step 1: there KL and its
    gradient are 0, and Adam's first steps, ~lr·sign(g), turn float rounding in near-0 gradients into weight
    differences of ~lr that a 1e-4-nat KL shows.)"""
    kl = {"strategy": "kl", "weight": 1.5, "ce_weight": 0.0, "samples_per_step": 2, "forward": "auto"}
    run = tmp_path / "run"
    joint = {**kl, "forward": "joint"}
    config = write_config(tmp_path / "kl.yaml", prep, run, steps=4, replay=joint, checkpoint={"every": 2})
    logged = run_training(config)
    assert "loss from hidden states" in logged.stdout + logged.stderr
    assert "replay: samples in the task rows' forward" in logged.stdout + logged.stderr
    m = metrics(run)
    assert m[1]["loss/kl"] == 0.0 and m[4]["loss/kl"] > 1e-5  # 0 exactly: the packed states are the padded ones
    for step in range(1, 5):
        assert m[step]["loss/replay_ce"] > 1.0  # measured on the replay rows, weight 0
        assert m[step]["loss"] == pytest.approx(m[step]["loss/task_ce"] + 1.5 * m[step]["loss/kl"], rel=1e-9)
    step2 = CheckpointDir.for_step(checkpoint_root(run), 2).path
    full = write_config(
        tmp_path / "full.yaml",
        prep,
        tmp_path / "full",
        steps=3,
        model={"chunked_loss": False},
        replay=kl,
        checkpoint={"every": 0, "resume": str(step2)},
    )
    run_training(full)
    f = metrics(tmp_path / "full")
    assert m[3]["loss/kl"] > 1e-5 and min(f) == 3
    for key in ("loss", "loss/task_ce", "loss/replay_ce", "grad_norm"):
        assert m[3][key] == pytest.approx(f[3][key], rel=1e-5), key
    # KL is a difference of near-equal log-probabilities: fp32 logits that round differently (one GEMM on
    # all positions or a chunk at a time) move it ~1e-5 relative; the last position or a padded one
    # counted or not would move it by percents
    assert m[3]["loss/kl"] == pytest.approx(f[3]["loss/kl"], rel=1e-4)

    # The dynamic weight, (task CE + replay CE) / KL per rank, from the same checkpoint on both paths (the samples
    # in their own forward in both): through the head loss it needs the KL before the head's forward, so a no-grad
    # head pass (a second gather of the head weight on each ZeRO-3 rank) measures it first. The cap is lifted so
    # that the ratio, not the cap, is the weight: the two paths must give the same weight, losses and gradient
    # norm.
    dynamic = {**kl, "weight": "dynamic", "max_weight": 1e9}
    d = {}
    for chunked in (True, False):
        resumed = write_config(
            tmp_path / f"dynamic-{chunked}.yaml",
            prep,
            tmp_path / f"dynamic-{chunked}",
            steps=3,
            model={"chunked_loss": chunked},
            replay=dynamic,
            checkpoint={"every": 0, "resume": str(step2)},
        )
        resumed_log = run_training(resumed)
        assert "replay rows in their own forward" in resumed_log.stdout + resumed_log.stderr
        d[chunked] = metrics(tmp_path / f"dynamic-{chunked}")[3]
    assert 1e3 < d[True]["replay_weight"] < 1e9  # CE over a KL of ~1e-4: the ratio, far from 1.5 and the cap
    assert d[True]["loss"] == pytest.approx(
        d[True]["loss/task_ce"] + d[True]["replay_weight"] * d[True]["loss/kl"], rel=1e-9
    )
    for key in ("replay_weight", "loss/kl", "loss", "grad_norm"):  # a ratio over the KL: the KL's 1e-4 carries over
        assert d[True][key] == pytest.approx(d[False][key], rel=1e-4), key
    assert d[True]["loss/task_ce"] == pytest.approx(d[False]["loss/task_ce"], rel=1e-5)


def async_ds_json(path: Path) -> str:
    """The CPU config with DeepSpeed's decoupled checkpoint writer, as zero3_bf16.json has it."""
    ds = json.loads((ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    ds["checkpoint"] = {"writer": {"type": "python", "decoupled": True}}
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.mark.reliability("faults: SIGTERM")
@pytest.mark.parametrize("writer", ["sync", "async"])
def test_sigterm_saves_a_checkpoint_and_exits_then_resume_continues(writer, prep, tmp_path, lost):
    """SIGTERM to every process of the job, the checkpoint writers too (as SLURM and Ctrl-C signal): saved."""
    run = tmp_path / "run"
    ds = {"deepspeed": async_ds_json(tmp_path / "ds.json")} if writer == "async" else {}
    config = write_config(tmp_path / "long.yaml", prep, run, steps=400, checkpoint={"every": 0}, **ds)
    proc = start_training(config, output=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the job, as SLURM preemption does
    output, _ = proc.communicate(timeout=120)
    latest = CheckpointDir.latest(checkpoint_root(run))
    assert latest is not None, output[-3000:]
    stopped_at = CheckpointDir(latest.path).state()["step"]
    assert lost(0 if latest.is_complete() else stopped_at) == 0  # steps not saved
    assert 3 <= stopped_at < 400
    assert "SIGTERM/SIGINT: saving a checkpoint" in output
    resumed = write_config(tmp_path / "short.yaml", prep, run, steps=stopped_at + 2, checkpoint={"every": 0}, **ds)
    run_training(resumed)
    assert CheckpointDir.for_step(checkpoint_root(run), stopped_at + 2).is_complete()


def test_ewc_holds_the_weights_its_fisher_marks_important(reference, prep, tmp_path):
    """EWC lets unimportant weights move: measure what it protects, the Fisher-weighted distance."""
    from pipeline.gere.cache import pad_replay_rows
    from pipeline.losses.replay import causal_ce

    config = write_config(
        tmp_path / "ewc.yaml", prep, tmp_path / "run", penalty={"kind": "ewc", "weight": 200.0, "ewc_batches": 4}
    )
    result = run_training(config)
    assert "EWC: diagonal Fisher from 4 replay batches" in result.stdout + result.stderr
    base = load_causal_lm(ModelSource(config=TINY_LLAMA, seed=0))
    shard = ReplayShard.open(prep / "replay")
    rows, replay_len = shard.rows(), shard.replay_len
    fisher = {k: torch.zeros_like(v) for k, v in base.named_parameters()}
    for b in range(4):  # the trainer's batches: rank r reads rows ((b·2 + r)·2) mod N, gradients averaged over ranks
        base.zero_grad()
        for r in range(2):
            start = ((b * 2 + r) * 2) % len(rows)
            ids, mask = pad_replay_rows(rows[start : start + 2]["input_ids"], replay_len)
            (causal_ce(base(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask) / 2).backward()
        for k, p in base.named_parameters():
            fisher[k] += p.grad.detach() ** 2
    initial = {k: v.detach().float() for k, v in base.named_parameters()}

    def weighted(weights):
        return sum((fisher[k] * (weights[k].detach() - initial[k]) ** 2).sum().item() for k in fisher)

    assert weighted(final_weights(tmp_path / "run")) < 0.5 * weighted(final_weights(reference[1]))


@pytest.mark.reliability("security")
def test_resume_on_another_number_of_ranks_with_the_same_global_batch(reference, prep, tmp_path, lost):
    """2 ranks × 2 rows → 1 rank × 2 rows × 2 accumulation steps: the same rows per step, the same training."""
    _, ref_run = reference
    run, source = tmp_path / "run", CheckpointDir.for_step(checkpoint_root(ref_run), 6)
    before = digest(ref_run / "checkpoints")
    config = write_config(
        tmp_path / "one_rank.yaml",
        prep,
        run,
        batch={"micro_batch": 2, "grad_accum": 2},
        checkpoint={"resume": str(source.path)},
    )
    result = run_training(config, ranks=1)
    assert "converting it to" in result.stdout + result.stderr
    assert source.universal(checkpoint_root(run)).is_complete()  # in this run's directory,
    assert lost(len(set(before.items()) ^ set(digest(ref_run / "checkpoints").items()))) == 0  # nothing beside it
    ref, got = metrics(ref_run), metrics(run)
    for step in range(7, 13):  # another reduction order: equal up to float rounding, not bitwise
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4), step


def test_one_replay_sample_a_step_on_two_ranks_trains_as_on_one_rank(prep, tmp_path):
    """replay.samples_per_step 1 on 2 ZeRO-3 ranks: rank 0 scores the sample, rank 1 runs a padding row of the
    same shape that weighs nothing, and the step is the 1-rank run's with the same global batch (2 rows ×
    2 accumulation steps, the sample in its first micro-batch): the gradient is the mean intended, not a half
    or a double of the replay term."""
    replay = {"strategy": "kl", "weight": 1.5, "ce_weight": 1.0, "samples_per_step": 1}
    runs = {}
    for ranks, accum in ((2, 1), (1, 2)):
        run = tmp_path / f"run-{ranks}"
        config = write_config(
            tmp_path / f"{ranks}.yaml",
            prep,
            run,
            steps=4,
            batch={"micro_batch": 2, "grad_accum": accum},
            replay=replay,
            checkpoint={"every": 0},
        )
        run_training(config, ranks=ranks)
        runs[ranks] = metrics(run)
    for step in range(1, 5):  # another reduction order: equal up to float rounding
        for key in ("loss", "loss/replay_ce", "loss/kl", "grad_norm"):
            assert runs[2][step][key] == pytest.approx(runs[1][step][key], rel=1e-4, abs=1e-9), (step, key)
    assert runs[2][4]["loss/kl"] > 0  # the model drifted from the base: a replay term to compare


def test_eval_reads_a_checkpoint_or_its_export_alike(reference, prep, tmp_path):
    from pipeline.eval import holdout_document_losses, load_hf, multiple_choice
    from pipeline.evaluation.perplexity import perplexities

    _, run = reference
    checkpoint = latest_checkpoint(run)
    model = load_hf(checkpoint)
    # whole documents, as the trainer and the report score (first windows alone read another figure)
    whole = perplexities(holdout_document_losses(model, prep, max_docs=4))
    logged = metrics(run)[12]
    assert whole["ppl/general"] == pytest.approx(logged["ppl/general"], rel=1e-5)
    assert whole["ppl/domain"] == pytest.approx(logged["ppl/domain"], rel=1e-5)
    first_windows = perplexities(holdout_document_losses(model, prep, max_docs=4, whole_documents=False))
    assert first_windows["ppl/domain"] != whole["ppl/domain"]
    # Two ranks: the checkpoint exported once, the model partitioned with ZeRO-3, documents and multiple-choice
    # pairs (an odd number: one rank pads) split: same figures.
    questions = tmp_path / "q.csv"
    questions.write_text('"def f(x): return","x","import","class","A"\n"for i in","range(3):","else","B"\n')
    one_process = multiple_choice(model, prep, [str(questions)])
    out = tmp_path / "eval.json"
    ranks = run_deepspeed(
        "pipeline.eval",
        ["--model", str(checkpoint), "--prep", str(prep), "--max-docs", "4", "--out", str(out)]
        + ["--mcq", str(questions)],
        ranks=2,
        capture=True,
        timeout=600,
    )
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    assert "partitioned over 2 ranks (ZeRO-3, float32)" in ranks.stdout + ranks.stderr
    partitioned = json.loads(out.read_text())["tuned"]
    for key in ("ppl/general", "ppl/domain"):
        assert partitioned[key] == pytest.approx(whole[key], rel=1e-5), key
    assert {k: v for k, v in partitioned.items() if k.startswith("mcq/")} == one_process
    assert not list(checkpoint.parent.glob(".eval-export-*"))  # the temporary export is gone


def test_async_saves_hold_their_steps_state_and_leave_training_unchanged(reference, prep, tmp_path):
    """DeepSpeed's decoupled writer: every checkpoint equals the synchronous run's of its step, bitwise, weights
    and optimizer moments alike (the writers finished before the next optimizer step), and the losses are too."""
    ref_config, ref_run = reference
    run = tmp_path / "run"
    result = run_training(write_config(tmp_path / "cpt.yaml", prep, run, deepspeed=async_ds_json(tmp_path / "ds.json")))
    assert "DecoupledCheckpointEngine" in result.stdout + result.stderr  # the writer processes did the saving
    ref, got = metrics(ref_run), metrics(run)
    assert [got[s]["loss"] for s in range(1, 13)] == [ref[s]["loss"] for s in range(1, 13)]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for step in range(2, 13, 2):
        mine, theirs = (CheckpointDir.for_step(checkpoint_root(r), step) for r in (run, ref_run))
        verify_checkpoint(mine.path)  # every file has the size and CRCs the manifest wrote at the commit
        a, b = (get_fp32_state_dict_from_zero_checkpoint(str(c.root), tag=c.tag) for c in (mine, theirs))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
        for rank in range(2):
            name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            moments = [
                torch.load(c.path / name, weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]["state"]
                for c in (mine, theirs)
            ]
            assert all(
                torch.equal(moments[0][g][k], moments[1][g][k]) for g in moments[1] for k in ("exp_avg", "exp_avg_sq")
            ), (step, rank)
