"""The whole pipeline on a real pretrained checkpoint (SmolLM2-135M, sharded): what users bring.

One module-scoped `cpt run` does what a user does: a run file naming the model
directory (also the tokenizer) and two corpora; prep, the GeRe cache, a few CPT
steps with TM replay on 2 ZeRO-3 ranks, export with --verify, eval base vs tuned
and the report card. The tests then check each promise.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline.runtime.isolation import DocumentLeak, check_document_isolation, forward_packed, isolation_error

from .train_helpers import (
    ROOT,
    env,
    export_checkpoint,
    latest_checkpoint,
    make_prep,
    metrics,
    run_training,
    write_config,
)

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def sharded_smollm2(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 saved as several safetensors shards plus its tokenizer: a base whose files an export must not copy."""
    from transformers import AutoModelForCausalLM

    from data_prep.tokenizer import HF_TOKENIZER_FILES

    out = tmp_path_factory.mktemp("smollm2_sharded")
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), local_files_only=True)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="150MB")
    for name in HF_TOKENIZER_FILES:
        if (smollm2 / name).is_file():
            (out / name).write_bytes((smollm2 / name).read_bytes())
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


@pytest.fixture(scope="module")
def real_run(sample, sharded_smollm2, tmp_path_factory) -> dict[str, Path]:
    """One `cpt run` on a run file naming the model directory (its own tokenizer) and two corpora."""
    root = tmp_path_factory.mktemp("real_run")
    run_file = root / "run.yaml"
    run_file.write_text(
        yaml.safe_dump(
            {
                "run_dir": "out",
                "gpus": 2,
                "model": {"path": str(sharded_smollm2)},
                "data": {
                    "seq_len": 64,
                    "docs_per_chunk": 16,
                    "sources": [
                        {"name": "code", "role": "domain", "paths": str(sample.domain)},
                        {"name": "docs", "role": "general", "paths": str(sample.general)},
                    ],
                    "mix": {"general_ratio": 0.15, "batch_rows": 4},
                    "replay": {"num_samples": 12, "replay_len": 32, "probe_docs": 4},
                    "holdout": {"fraction": 0.05},
                },
                "deepspeed": "zero3_cpu",
                "steps": 3,
                "optim": {"lr": 1e-4, "warmup_steps": 1},
                "checkpoint": {"every": 0},
                "replay": {"strategy": "tm", "samples_per_step": 2},
                "eval": {"max_docs": 4},
                "export": {"verify": True},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(run_file)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "max_abs_logit_diff=0" in done.stdout  # the export's logits are the engine's, exactly
    out = root / "out"
    return {
        "root": root,
        "prep": out / "prep",
        "run": out / "train",
        "config": out / "train.yaml",
        "hf": out / "export",
        "base": sharded_smollm2,
        "eval": out / "export" / "eval.json",
    }


def test_tm_is_exactly_zero_at_step_1_and_the_loss_is_finite(real_run):
    m = metrics(real_run["run"])
    assert m[1]["loss/tm"] == 0.0  # the replay forward reproduces the cache built from the same checkpoint
    assert all(torch.isfinite(torch.tensor(m[s]["loss"])) for s in (1, 2, 3))
    assert m[3]["loss/tm"] > 0  # and the updates moved the activations


def test_export_holds_the_trained_weights_not_the_base_ones(real_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf, base = real_run["hf"], real_run["base"]
    assert sorted(p.name for p in hf.glob("*.safetensors")) == ["model.safetensors"]  # no base shard copied in
    assert not (hf / "model.safetensors.index.json").exists()
    exported = load_file(str(hf / "model.safetensors"))
    base_weights = {}
    for shard in base.glob("model-*.safetensors"):
        base_weights.update(load_file(str(shard)))
    assert "lm_head.weight" not in exported and json.loads((hf / "config.json").read_text())["tie_word_embeddings"]
    moved = max(float((exported[k] - base_weights[k]).abs().max()) for k in exported)
    assert moved > 1e-6  # trained (the engine's logits equal the export's: checked by --verify in the fixture)
    model = AutoModelForCausalLM.from_pretrained(str(hf), local_files_only=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert (hf / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()


def test_eval_compares_base_and_tuned_on_both_holdouts(real_run):
    result = json.loads(real_run["eval"].read_text())
    for name in ("base", "tuned"):
        assert 1 < result[name]["ppl/general"] < 1e4 and 1 < result[name]["ppl/domain"] < 1e4
    assert result["base"]["ppl/general"] != result["tuned"]["ppl/general"]
    for role in ("general", "domain"):  # 4 documents each, and none moved exactly as the others did
        assert 0 < result[f"{role}_ppl_change_se"] < 1, result


def test_the_memory_planner_is_within_20_percent_of_the_measured_peak(real_run):
    """SmolLM2-135M, fp32, 2 ZeRO-3 CPU ranks, TM replay: the plan against rank 0's logged peak."""
    from pipeline.config import load_train_config

    cfg = load_train_config(real_run["config"])
    assert_planned_within_20_percent(cfg, real_run["run"])


def assert_planned_within_20_percent(cfg: Any, run: Path) -> None:
    from pipeline.plan import model_shape, plan_memory

    plan = plan_memory(cfg, 2, model_shape(cfg, cuda=False), "cpu")
    measured = max(row["peak_mem_gb"] for row in metrics(run).values() if "peak_mem_gb" in row) * 1e9
    terms = {k: round(v / 1e9, 3) for k, v in plan.terms.items()}
    assert abs(plan.total - measured) <= 0.2 * measured, (plan.total / 1e9, terms, measured / 1e9)


def test_the_planner_counts_the_merge_to_budget_search_within_20_percent_of_its_measured_peak(real_run):
    """merge --to-budget's α search on SmolLM2 on the CPU (the run's export toward the sharded base, fp32), in
    one process (it sets the weights at α 0 and 1 at least): its peak resident memory above the process's
    start against the plan's merge step."""
    from pipeline.config import load_train_config
    from pipeline.plan import merge_memory, model_shape
    from pipeline.runfile import MergeSection

    script = (
        "import json, sys, torch, datasets, transformers, pipeline.eval\n"
        "from pathlib import Path\n"
        "from pipeline.merge import search_alpha\n"
        "from pipeline.training.metrics import PeakMemory\n"
        "peak = PeakMemory(torch.device('cpu'), reset_peak=True)\n"
        "found = search_alpha(*map(Path, sys.argv[1:4]), 0.05, device=torch.device('cpu'))\n"
        "print(json.dumps({'peak_gb': peak.peak_gb(), 'alpha': found['alpha']}))\n"
    )
    args = [str(real_run[k]) for k in ("base", "hf", "prep")]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    cfg = load_train_config(real_run["config"])
    shape = model_shape(cfg, cuda=False)
    planned = merge_memory(MergeSection(to_budget=0.05), shape, 4, 64, "5GB", adapter=False, cuda=False)
    assert abs(planned["search"] / 1e9 - measured["peak_gb"]) <= 0.2 * measured["peak_gb"], (planned, measured)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_documents_do_not_see_each_other_at_micro_batch_2(smollm2, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2), local_files_only=True, attn_implementation=attn).eval()
    assert check_document_isolation(model, attn, model.config.vocab_size, 2, torch.float32) < 1e-4

    def without_positions(**kw):  # what a version without the packed-sequence mask does: one long document
        kw.pop("position_ids")
        return model(**kw)

    assert isolation_error(without_positions, attn, model.config.vocab_size, 2) > 1e-2
    with pytest.raises(DocumentLeak, match=f"'{attn}'.*attend to each other"):
        check_document_isolation(without_positions, attn, model.config.vocab_size, 2, torch.float32)


def test_varlen_attention_runs_a_micro_batch_as_one_row(smollm2):
    """FA2 keeps documents apart only in a batch of one row: forward_packed flattens, and the logits are the same."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2), local_files_only=True, attn_implementation="sdpa").eval()
    seen: list[tuple[int, ...]] = []

    def recording(**kw):
        seen.append(tuple(kw["input_ids"].shape))
        return model(**kw)

    ids = torch.randint(4, 1000, (2, 16))
    positions = torch.cat([torch.arange(10), torch.arange(6)]).repeat(2, 1)
    with torch.no_grad():
        flat = forward_packed(recording, ids, positions, "flash_attention_2")
        rows = forward_packed(recording, ids, positions, "sdpa")
    assert seen == [(1, 32), (2, 16)] and flat.shape == rows.shape
    assert torch.allclose(flat, rows, atol=1e-4)


def test_lora_on_smollm2_learns_leaves_the_base_alone_and_exports_the_trained_logits(real_run, tmp_path):
    """LoRA r 8 with replay KL on the sharded SmolLM2, 2 ZeRO-3 ranks, on the run's own prep: the held-out
    domain perplexity falls, the planner is within 20% of the measured peak (ZeRO-3 keeps the whole model
    gathered there: it is reused within stage3_max_reuse_distance), the exported model's logits are the
    engine's (--verify), and every tensor LoRA does not wrap is the base's bitwise."""
    from safetensors.torch import load_file

    from pipeline.config import load_train_config

    cfg = yaml.safe_load(real_run["config"].read_text())
    run = tmp_path / "run"
    cfg.update(
        run_dir=str(run),
        steps=6,
        adapter={"kind": "lora", "r": 8, "alpha": 16.0},
        replay={"strategy": "kl", "weight": 1.5, "ce_weight": 0.0, "samples_per_step": 2},
        optim={"lr": 1e-3, "warmup_steps": 1},
        eval={"max_docs": 4, "every": 6},  # and at step 0: the base
        checkpoint={"every": 0},
    )
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_training(config)
    m = metrics(run)
    assert m[1]["loss/kl"] == 0.0  # the adapters start as a no-op, and the teacher is the base they sit on
    assert m[6]["ppl/domain"] < m[0]["ppl/domain"], (m[0], m[6])
    assert_planned_within_20_percent(load_train_config(config), run)

    out = tmp_path / "hf"
    done = export_checkpoint(latest_checkpoint(run), out, "--verify", "--adapter-out", "adapter")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    exported = load_file(str(out / "model.safetensors"))
    base = {}
    for shard in real_run["base"].glob("model-*.safetensors"):
        base.update(load_file(str(shard)))
    adapted = {k for k in exported if k.endswith("_proj.weight")}
    assert adapted and all(not torch.equal(exported[k], base[k]) for k in adapted)
    assert all(torch.equal(exported[k], base[k]) for k in exported.keys() - adapted)


def test_batched_eval_windows_score_each_document_as_one_window_a_forward_does(smollm2, sample, monkeypatch):
    """Eval stacks windows of different lengths into one forward, padded on the right: every document's NLL and
    token count are those of running its windows one at a time (documents of 1 token, of seq_len, and longer)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(str(smollm2), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    texts = [t for t in sample.texts("general") if len(t) > 2000][:3]
    docs = [tokenizer(t)["input_ids"][:n] for t, n in zip(texts, (200, 32, 20))] + [[17]]
    masks = [[1] * len(d) for d in docs]
    masks[0][40:60] = [0] * 20  # unscored tokens inside a window
    seq_len = 32
    expected = torch.zeros(len(docs), 2, dtype=torch.float64)
    with torch.no_grad():
        for d, start in perplexity.windows([len(x) for x in docs], seq_len):
            ids = torch.tensor([docs[d][start : start + seq_len]])
            if ids.shape[1] < 2:
                continue
            target = ids[0, 1:].masked_fill(
                ~torch.tensor(masks[d][start + 1 : start + seq_len], dtype=torch.bool), -100
            )
            nll = F.cross_entropy(model(input_ids=ids).logits[0, :-1], target, ignore_index=-100, reduction="sum")
            expected[d] += torch.tensor([nll.item(), (target != -100).sum().item()], dtype=torch.float64)
    shapes: list[tuple[int, ...]] = []

    def recording(ids: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(ids.shape))
        return model(input_ids=ids).logits

    monkeypatch.setattr(perplexity, "TOKENS_PER_FORWARD", 4 * seq_len)
    got = perplexity.document_losses(recording, docs, masks, seq_len)
    assert shapes == [(4, 32), (4, 32), (2, 20)]  # 10 windows, 4 a forward, the last two padded to 20
    assert torch.equal(got[:, 1], expected[:, 1]) and got[3].tolist() == [0.0, 0.0]
    assert torch.allclose(got[:, 0], expected[:, 0], rtol=1e-5)
