"""Training building blocks without the launcher: inputs from packed rows, document isolation, order, schedule."""

from __future__ import annotations

import math
import re
from pathlib import Path

import datasets
import pytest
import torch

from cpt_core.errors import ConfigError, UserError
from data_prep.build import BuildOptions, SourceSpec, build_source, chunk_tables
from data_prep.prep_dir import PrepDir
from pipeline.config import load_train_config
from pipeline.runtime.isolation import forward_packed
from pipeline.runtime.model import ModelSource, load_causal_lm
from pipeline.training.data import GlobalOrder, packed_inputs, role_flags, teacher_rows
from pipeline.training.schedule import lr_at

from .train_helpers import TINY_LLAMA


def test_position_ids_restart_per_document_and_segment_starts_carry_no_label():
    rows = {"input_ids": [[5, 6, 7, 8, 9, 10]], "loss_mask": [[1, 1, 1, 1, 1, 1]], "doc_lens": [[2, 3, 1]]}
    batch = packed_inputs(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9, -100]]


def test_instruction_prompt_tokens_carry_no_loss(sample, tmp_path):
    out = build_source(
        SourceSpec(name="qa", role="instruction", paths=(str(sample.instruction),), holdout_fraction=0),
        BuildOptions(seq_len=256, max_reject_fraction=0.5),
        str(sample.tokenizer),
        tmp_path,
        quiet=True,
    )
    table = next(chunk_tables(out, "rows"))
    rows = table.slice(0, 4).to_pydict()
    labels = packed_inputs(rows)["labels"]
    mask = torch.tensor(rows["loss_mask"], dtype=torch.bool)
    assert torch.all(labels[~mask] == -100)  # every prompt and padding token: no loss
    assert (labels != -100).sum() > 0 and (labels[mask] != -100).float().mean() > 0.9


def test_a_documents_logits_are_the_same_packed_and_alone(sample, tmp_path):
    out = build_source(
        SourceSpec(name="g", role="general", paths=(str(sample.general),), holdout_fraction=0),
        BuildOptions(seq_len=96),
        str(sample.tokenizer),
        tmp_path,
        quiet=True,
    )
    rows = next(chunk_tables(out, "rows")).to_pydict()
    k = next(i for i, lens in enumerate(rows["doc_lens"]) if len(lens) >= 2 and lens[1] > 1)
    one = {key: [rows[key][k]] for key in ("input_ids", "loss_mask", "doc_lens")}
    model = load_causal_lm(ModelSource(config=TINY_LLAMA, seed=0)).eval()
    batch = packed_inputs(one)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for n in one["doc_lens"][0]:
            alone = model(input_ids=batch["input_ids"][:, start : start + n], use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-4, atol=1e-5)
            start += n


def test_each_step_reads_the_same_rows_for_any_split_of_the_same_global_batch():
    a = [GlobalOrder(50, micro_batch=2, grad_accum=2, world=2, rank=r) for r in range(2)]
    b = [GlobalOrder(50, micro_batch=1, grad_accum=4, world=2, rank=r) for r in range(2)]
    c = [GlobalOrder(50, micro_batch=4, grad_accum=2, world=1, rank=0)]
    for step in range(30):  # wraps into later epochs too
        sets = [sorted(i for o in split for j in range(o.accum) for i in o.rows(step, j)) for split in (a, b, c)]
        assert sets[0] == sets[1] == sets[2] == sorted(a[0].global_rows(step))


def test_the_prefetching_reader_gives_each_step_its_own_rows_and_reads_nothing_else(prep):
    from pipeline.training.data import StepReader

    mixture = datasets.load_from_disk(str(PrepDir(prep).read().mixture_rows))
    read: list[int] = []

    class Recording:  # the mixture, recording which rows are read
        def __getitem__(self, rows):
            read.extend(rows)
            return mixture[rows]

    order = GlobalOrder(len(mixture), micro_batch=2, grad_accum=2, world=4, rank=1)  # 16 rows a step, 4 of them ours
    reader = StepReader(Recording(), order, torch.device("cpu"))
    try:
        for step in (0, 1, 2, 7, 8):  # in sequence (prefetched), then a jump (a resume)
            got = reader.read(step)
            for j, batch in enumerate(got):
                want = packed_inputs(mixture[order.rows(step, j)])
                assert all(torch.equal(batch[k], want[k]) for k in want)
    finally:
        reader.close()
    ours = {i for step in (0, 1, 2, 3, 7, 8, 9) for j in range(2) for i in order.rows(step, j)}
    assert set(read) <= ours and len(read) <= 4 * 7  # this rank's rows only; at most one step read ahead


def test_the_teacher_runs_on_the_distilled_rows_and_every_rank_chooses_alike(prep):
    """kd.rows general: the teacher's forward is collective under ZeRO-3, so for each micro-batch every rank
    runs it or none does; a rank runs its general rows (its first row when it has none), and those rows'
    outputs are the ones a forward of the whole micro-batch gives them."""
    mixture = datasets.load_from_disk(str(PrepDir(prep).read().mixture_rows))
    flags = role_flags(mixture, "general")
    assert flags.tolist() == [role == "general" for role in mixture["role"]] and 0 < flags.sum() < len(flags)
    orders = [GlobalOrder(len(mixture), micro_batch=2, grad_accum=2, world=3, rank=r) for r in range(3)]
    seen = set()
    for step in range(len(mixture) // orders[0].global_batch + 1):
        for j in range(2):
            runs = [teacher_rows(flags, order, step, j) for order in orders]
            anywhere = any(flags[order.rows(step, j)].any() for order in orders)
            assert (runs == [None] * 3) == (not anywhere)
            for order, run in zip(orders, runs):
                if run is not None:
                    mine = flags[order.rows(step, j)]
                    assert run == ([i for i in range(2) if mine[i]] or [0])
                    seen.add("idle rank" if not mine.any() else "subset" if not mine.all() else "every row")
            seen.add("teacher runs" if anywhere else "no teacher")
    assert {"idle rank", "subset", "teacher runs", "no teacher"} <= seen  # the mix spreads general rows apart

    model = load_causal_lm(ModelSource(config=TINY_LLAMA, seed=0)).eval()
    batch = packed_inputs(mixture[[0, 1, 2, 3]])
    ids = batch["input_ids"] % TINY_LLAMA["vocab_size"]
    with torch.no_grad():
        whole = forward_packed(model, ids, batch["position_ids"], "sdpa", hidden=True)
        part = forward_packed(model, ids[[1, 3]], batch["position_ids"][[1, 3]], "sdpa", hidden=True)
    torch.testing.assert_close(part, whole[[1, 3]], rtol=1e-5, atol=1e-5)


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    peak, total, warm = 1e-3, 100, 10
    assert [lr_at(s, peak, total, warm) for s in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert lr_at(warm, peak, total, warm) == pytest.approx(peak)
    assert lr_at(total, peak, total, warm, "cosine", 0.1) == pytest.approx(1e-4)
    assert lr_at(total, peak, total, warm, "linear", 0.1) == pytest.approx(1e-4)
    mid = warm + (total - warm) // 2
    assert lr_at(mid, peak, total, warm, "cosine", 0.0) == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(50, peak, total, warm, "constant") == peak


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_holds_the_peak_then_decays_over_its_last_fraction_by_its_shape(shape):
    peak, total, warm, floor = 1e-3, 100, 5, 1e-4
    lrs = [lr_at(s, peak, total, warm, "wsd", 0.1, decay_fraction=0.2, decay_shape=shape) for s in range(total + 1)]
    assert lrs[:warm] == pytest.approx([peak * (s + 1) / warm for s in range(warm)])
    assert lrs[warm:81] == [peak] * (81 - warm)  # stable until step 80: the last 20 steps decay
    progress = [(s - 80) / 20 for s in range(80, total + 1)]
    formula = {
        "linear": [1 - p for p in progress],
        "cosine": [0.5 * (1 + math.cos(math.pi * p)) for p in progress],
        "1-sqrt": [1 - math.sqrt(p) for p in progress],
    }[shape]
    assert lrs[80:] == pytest.approx([floor + (peak - floor) * f for f in formula])
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :]))


@pytest.mark.parametrize(
    "override, message",
    [
        (["optim.lr=-1"], "optim.lr must be > 0"),
        (["optim.sheduler=cosine"], "unknown key 'optim.sheduler'"),
        (["stage=pretrain"], "stage must be cpt | sft | mixed"),
        (["tokens=1000"], "steps/tokens must be exactly one set"),
        (["replay.strategy=tm"], "replay.cache must be set"),
        (["batch.micro_batch=0"], "batch.micro_batch must be >= 1"),
        (["model.config=oops"], "model.config must be a mapping or null, got 'oops'"),
        (["steps=1.5"], "steps must be an integer or null, got 1.5"),
        (["model.gradient_checkpointing=1"], "model.gradient_checkpointing must be true or false, got 1"),
        (["replay.weight=[1]"], "replay.weight must be a number or dynamic, got [1]"),
        (["model.dtype=fp8"], "model.dtype must be auto | float32 | bfloat16 | float16"),
        (["forgetting.budget=0.02"], "set with something to scale"),  # replay.strategy none, no KD
        (["forgetting.budget=0.02", "replay.strategy=ce", "replay.ce_weight=0"], "set with something to scale"),
        (
            ["forgetting.budget=0.02", "replay.strategy=l2", "replay.cache=c", "replay.weight=0", "replay.ce_weight=0"],
            "to scale",
        ),
    ],
)
def test_bad_training_config_names_the_field(override, message, tmp_path):
    base = ["data.prep=p", "steps=5", "model.config={hidden_size: 8}"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(None, base + override)


def test_stage_presets_fill_the_learning_rate():
    base = ["data.prep=p", "steps=5", "model.config={hidden_size: 8}"]
    assert load_train_config(None, base + ["stage=cpt"]).peak_lr == 2e-5
    assert load_train_config(None, base + ["stage=sft"]).peak_lr == 1e-6
    assert load_train_config(None, base + ["stage=sft", "optim.lr=3e-6"]).peak_lr == 3e-6


def test_mfu_is_six_n_flops_per_token_over_the_peak():
    from pipeline.training.metrics import device_peak_flops, model_flops_utilization

    assert model_flops_utilization(tokens_per_s=1000.0, n_params=1_000_000, peak_flops=6e12) == pytest.approx(1e-3)
    assert device_peak_flops(100.0) == 100e12
    assert device_peak_flops(None) is None or device_peak_flops(None) > 1e13  # None on CPU-only machines


def test_the_example_run_file_in_launch_is_valid_once_its_paths_exist(sample, tmp_path):
    import json
    from pathlib import Path

    from pipeline.runfile import load_run

    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 128256, "max_position_embeddings": 8192}))
    sources = [{"name": "law", "role": "domain", "paths": str(sample.domain)}]
    sources.append({"name": "web", "role": "general", "paths": str(sample.general)})
    overrides = [f"model.path={model}", f"data.tokenizer={sample.tokenizer}", f"data.sources={json.dumps(sources)}"]
    run = load_run(Path(__file__).resolve().parents[1] / "launch" / "cpt_example.yaml", overrides)
    cfg = run.train
    assert cfg.peak_lr == 2e-5 and cfg.model.dtype == "auto" and run.gpus == 8
    # bench.forgetting's default: replay KL w 1.5 with cosine decay
    assert (cfg.replay.strategy, cfg.replay.weight, cfg.replay.ce_weight, cfg.optim.decay) == ("kl", 1.5, 0.0, "cosine")
    from pipeline.runtime.precision import resolve_dtype

    assert resolve_dtype(cfg.model.dtype, cfg.deepspeed, cuda=True) == "bfloat16"


def test_precision_auto_follows_the_deepspeed_json_then_the_device(tmp_path):
    from pipeline.runtime.precision import resolve_dtype

    root = Path(__file__).resolve().parents[1] / "ds_configs"
    assert resolve_dtype("auto", root / "zero3_bf16.json", cuda=False) == "bfloat16"  # the JSON asks for bf16
    assert resolve_dtype("auto", root / "zero3_cpu.json", cuda=True) == "bfloat16"  # GPU default
    assert resolve_dtype("auto", root / "zero3_cpu.json", cuda=False) == "float32"
    assert resolve_dtype("float32", root / "zero3_cpu.json", cuda=True) == "float32"  # explicit wins where no conflict
    with pytest.raises(UserError, match="model.dtype is float32 but .*zero3_bf16.json enables bf16"):
        resolve_dtype("float32", root / "zero3_bf16.json")
    both = tmp_path / "both.json"
    both.write_text('{"bf16": {"enabled": true}, "fp16": {"enabled": true}}')
    with pytest.raises(UserError, match="enables both bf16 and fp16"):
        resolve_dtype("auto", both)


def test_auto_zero_buckets_follow_the_hidden_size():
    from pipeline.runtime.ds_config import filled_ds_config

    base = ["data.prep=p", "steps=5", "model.config={hidden_size: 8}", "model.dtype=float32"]
    ds = filled_ds_config(load_train_config(None, base), world=2, hidden_size=576)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 576**2 and zero["stage3_prefetch_bucket_size"] == int(0.9 * 576**2)
    assert ds["bf16"]["enabled"] is False and ds["train_batch_size"] == 2


def test_eval_windows_predict_every_token_but_the_first_exactly_once():
    from pipeline.evaluation.perplexity import windows

    lengths, seq_len = [1, 2, 5, 16, 17, 40], 8
    predicted: dict[int, list[int]] = {d: [] for d in range(len(lengths))}
    for d, start in windows(lengths, seq_len):
        predicted[d] += range(start + 1, min(start + seq_len, lengths[d]))
    assert all(predicted[d] == list(range(1, n)) for d, n in enumerate(lengths))
    assert windows(lengths, seq_len, whole_documents=False) == [(d, 0) for d in range(len(lengths))]


def test_an_anchor_pull_reaches_the_next_forward_for_persistent_zero3_parameters_too():
    """2 ZeRO-3 ranks (tests/pull_probe.py): after a step and a pull back to the anchors, the next forward
    sees the anchors, also for the norm weights ZeRO-3 keeps gathered between steps (before: one step late)."""
    import json

    from pipeline.launch import run_deepspeed

    result = run_deepspeed("tests.pull_probe", [], ranks=2, capture=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert report["persistent"] and all("norm" in name for name in report["persistent"])
    off = {name: err for name, err in report["max_off_anchor"].items() if err > 1e-6}
    assert not off, off


def test_a_progress_line_is_due_every_n_steps_and_after_a_quiet_interval(monkeypatch):
    from pipeline.training import metrics

    clock = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    progress = metrics.ProgressLine(total_steps=1000, start_step=0, every=100, every_s=60.0)
    clock[0] += 10
    assert not progress.due(7) and progress.due(100)
    clock[0] += 59
    assert not progress.due(101)
    clock[0] += 2  # 61 s since the last line: a slow run is never quiet for longer than every_s
    assert progress.due(102) and not progress.due(103) and progress.due(1000)
    line = progress.line(250, {"loss": 2.5, "loss/task_ce": 2.4, "lr": 2e-5, "tokens_seen": 1_500_000})
    assert line.startswith("step 250/1000 | tokens 1.50M | loss 2.5 (task_ce 2.4) | lr 2e-05 | eta ")


def test_an_async_writer_is_filled_for_zero3_and_one_needing_a_build_on_the_nodes_is_refused(monkeypatch):
    from pipeline.runtime import ds_json

    assert ds_json.checkpoint_writer({}, "ds.json") is None
    filled = ds_json.checkpoint_writer({"checkpoint": {"writer": {"type": "python", "decoupled": True}}}, "ds.json")
    assert filled == {"type": "python", "decoupled": True, "data_parallel": "replica"}
    fast = {"checkpoint": {"writer": {"decoupled": True}}}  # DeepSpeed's default type: FastPersist, on async_io
    monkeypatch.setattr(ds_json, "_async_io_built", lambda: False)
    with pytest.raises(UserError, match="ds.json: checkpoint.writer.type 'fast' .* DS_BUILD_AIO=1"):
        ds_json.checkpoint_writer(fast, "ds.json")
    monkeypatch.setattr(ds_json, "_async_io_built", lambda: True)
    assert ds_json.checkpoint_writer(fast, "ds.json")["data_parallel"] == "replica"
    with pytest.raises(UserError, match="'mock' writes nothing"):
        ds_json.checkpoint_writer({"checkpoint": {"writer": {"type": "mock"}}}, "ds.json")
    offloaded = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, **fast}
    with pytest.raises(
        UserError, match="ds.json: checkpoint.writer.decoupled with zero_optimization.offload_optimizer"
    ):
        ds_json.checkpoint_writer(offloaded, "ds.json")
    with pytest.raises(UserError, match="ds.json: checkpoint must be an object"):
        ds_json.checkpoint_writer({"checkpoint": "async"}, "ds.json")
    assert ds_json.decoupled_writer(fast) and not ds_json.decoupled_writer({"checkpoint": {"writer": {}}})
