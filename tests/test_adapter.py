"""LoRA adapters (pipeline/training/adapter.py, adapter_export.py): PEFT in place, the base as teacher, export.

The unit tests compare with PEFT's own code (``merge_and_unload``, ``PeftModel``);
the run on 2 ZeRO-3 ranks checks what a user relies on: the adapter trains, the
teacher is the base (KL 0 at step 1), checkpoints hold the adapter alone and
resume exactly on another number of ranks, and the export is the trained model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model

from cpt_core.errors import ConfigError
from pipeline.checkpoint.files import CheckpointDir, checkpoint_root
from pipeline.config import AdapterConfig, TrainConfig, problems
from pipeline.runtime.model import ModelSource, load_causal_lm
from pipeline.training.adapter import AdapterFreeTeacher, adapters_disabled, add_adapters, lora_config
from pipeline.training.adapter_export import base_tensors, merged_tensors

from .train_helpers import TINY_LLAMA, export_checkpoint, final_weights, metrics, run_training, write_config

LORA = {"kind": "lora", "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": (), "modules_to_save": ("norm",)}


def tiny_base() -> torch.nn.Module:
    return load_causal_lm(ModelSource(config=TINY_LLAMA, seed=0))


def trained_adapter(seed: int = 1) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The tiny base with LoRA injected and every trained tensor moved off its start (as after training)."""
    model = tiny_base()
    add_adapters(model, AdapterConfig(**LORA), seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def test_the_streamed_merge_is_peft_merge_and_unload(tmp_path):
    """Base tensors read one at a time from safetensors files, merged with the adapter: PEFT's own merge of the
    same adapter into the same base, tensor for tensor; tensors the adapter does not touch are the base's bitwise."""
    base_dir = tmp_path / "base"
    tiny_base().save_pretrained(str(base_dir), safe_serialization=True, max_shard_size="100KB")
    assert len(list(base_dir.glob("*.safetensors"))) > 1
    _, trained = trained_adapter()
    cfg = {"model": {"path": str(base_dir)}, "init_from": None, "adapter": LORA}
    merged = merged_tensors(base_tensors(cfg), trained, LORA, "test")

    reference = get_peft_model(tiny_base(), lora_config(LORA))
    loaded = reference.load_state_dict({f"base_model.model.{k}": v for k, v in trained.items()}, strict=False)
    assert not loaded.unexpected_keys
    expected = reference.merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        ours = merged[name].contiguous()
        torch.testing.assert_close(ours, tensor, rtol=0, atol=1e-6, msg=name)
    untouched = "model.embed_tokens.weight"
    assert torch.equal(merged[untouched].contiguous(), tiny_base().state_dict()[untouched])
    assert not torch.equal(merged["model.norm.weight"].contiguous(), tiny_base().state_dict()["model.norm.weight"])


def test_a_trained_tensor_with_nowhere_to_go_is_an_error_not_dropped():
    _, trained = trained_adapter()
    trained["model.layers.9.mlp.up_proj.lora_A.default.weight"] = torch.zeros(4, 48)
    cfg = {"model": {"path": None, "config": TINY_LLAMA, "seed": 0, "dtype": "float32"}, "adapter": LORA}
    with pytest.raises(Exception, match="layers.9.mlp.up_proj"):
        merged_tensors(base_tensors(cfg), trained, LORA, "ckpt")


def test_adapters_off_compute_the_base_exactly_and_come_back_trainable():
    model, _ = trained_adapter()
    model.train()
    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        base = tiny_base()(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        with adapters_disabled(model):
            assert not model.training
            off = model(input_ids=ids).logits
    assert torch.equal(off, base)
    assert not torch.allclose(adapted, base)
    assert model.training
    assert all(p.requires_grad == ("lora_" in n or "modules_to_save" in n) for n, p in model.named_parameters())

    class Engine:  # how the trainer calls a teacher: like a DeepSpeed engine, with .module
        module = model

        def __call__(self, **kwargs):
            return model(**kwargs)

    out = AdapterFreeTeacher(Engine())(input_ids=ids).logits
    assert torch.equal(out, base) and not out.requires_grad


def test_adapter_settings_that_cannot_work_are_refused_by_name():
    cfg = TrainConfig(steps=1, init_from="/some/run/export")
    cfg.data.prep, cfg.model.path = "prep", "base"
    cfg.adapter.kind, cfg.kd.weight = "lora", 1.0
    assert any(p.startswith("init_from must be unset with an adapter") for p in problems(cfg))
    cfg.adapter.r, cfg.adapter.dropout = 0, 1.0
    found = problems(cfg)
    assert any(p.startswith("adapter.r must be") for p in found)
    assert any(p.startswith("adapter.dropout must be") for p in found)
    with pytest.raises(ConfigError, match="adapter.target_modules"):
        add_adapters(tiny_base(), AdapterConfig(kind="lora", target_modules=("no_such_proj",)), seed=0)
    with pytest.raises(ConfigError, match="output head"):
        add_adapters(tiny_base(), AdapterConfig(kind="lora", modules_to_save=("lm_head",)), seed=0)


def test_lora_on_two_zero3_ranks_trains_resumes_on_one_rank_and_exports_the_trained_model(prep, tmp_path):
    """Replay KL (w 1.5) with LoRA: the base with adapters off is the teacher, so KL is exactly 0 at step 1;
    the held-out domain perplexity falls; each checkpoint holds the adapter and its optimizer only; a one-rank
    resume from step 4 takes the steps the two-rank run took; the export's logits are the engine's (--verify),
    PEFT loads the adapter written beside it and gives the export's logits, and the tensors LoRA does not
    touch are the base's bitwise."""
    kl = {"strategy": "kl", "weight": 1.5, "ce_weight": 0.0, "samples_per_step": 2}
    adapter = {"kind": "lora", "r": 8, "alpha": 16.0}
    run = tmp_path / "run"
    common = {
        "replay": kl,
        "adapter": adapter,
        "steps": 8,
        "optim": {"lr": 3e-2, "warmup_steps": 1},
        "eval": {"every": 8},  # and at step 0: the base
    }
    run_training(write_config(tmp_path / "lora.yaml", prep, run, checkpoint={"every": 4}, **common))
    m = metrics(run)
    assert m[1]["loss/kl"] == 0.0 and m[8]["loss/kl"] > 0
    assert m[8]["ppl/domain"] < 0.95 * m[0]["ppl/domain"], (m[0], m[8])  # on the held-out domain documents
    saved = final_weights(run)
    assert saved and all(re.search(r"\.lora_[AB]\.default\.weight$", k) for k in saved)

    source = CheckpointDir.for_step(checkpoint_root(run), 4).path
    one = tmp_path / "one_rank"
    config = write_config(
        tmp_path / "one.yaml",
        prep,
        one,
        batch={"micro_batch": 2, "grad_accum": 2},
        checkpoint={"every": 0, "resume": str(source)},
        **common,
    )
    run_training(config, ranks=1)
    resumed = metrics(one)
    for step in range(5, 9):
        assert resumed[step]["loss"] == pytest.approx(m[step]["loss"], rel=1e-6), step

    out = tmp_path / "hf"
    done = export_checkpoint(CheckpointDir.latest_of_run(run).path, out, "--verify", "--adapter-out", "adapter")
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().rsplit("max_abs_logit_diff=", 1)[1]) < 1e-5
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8

    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    with_adapter = PeftModel.from_pretrained(tiny_base(), str(out / "adapter")).eval()
    ids = torch.arange(5, 69).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(
            with_adapter(input_ids=ids).logits, exported(input_ids=ids).logits, atol=1e-5, rtol=0
        )
    base = tiny_base().state_dict()
    for name, tensor in exported.state_dict().items():
        adapted = name.endswith("_proj.weight")
        assert torch.equal(tensor, base[name]) != adapted, name
