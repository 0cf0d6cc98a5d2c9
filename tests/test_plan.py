"""The memory planner on a Llama-3-8B config: exact parameter count, ZeRO-3 scaling, verdicts and advice.

Its agreement with measured peak memory is checked on a real run in ``test_real_models.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import load_train_config
from pipeline.plan import GB, HEADROOM, advise, main, model_shape, plan_memory

ROOT = Path(__file__).resolve().parent.parent
LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}
LLAMA3_8B_PARAMS = 8_030_261_248  # meta-llama/Meta-Llama-3-8B's published count


def config(tmp_path: Path, **sections) -> Path:
    raw = {
        "run_dir": str(tmp_path / "run"),
        "steps": 10,
        "deepspeed": str(ROOT / "ds_configs" / "zero3_bf16.json"),
        "data": {"prep": str(tmp_path / "no-prep-yet")},  # seq_len 4096 and replay_len 512 until there is one
        "model": {"config": LLAMA3_8B},
        "batch": {"micro_batch": 2, "grad_accum": 4},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = tmp_path / "cpt.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def planned(tmp_path: Path, ranks: int = 8, **sections):
    cfg = load_train_config(config(tmp_path, **sections))
    shape = model_shape(cfg, cuda=True)
    return cfg, shape, plan_memory(cfg, ranks, shape)


def test_parameters_come_from_the_architecture_and_model_states_shard_over_ranks(tmp_path):
    cfg, shape, eight = planned(tmp_path, 8)
    assert shape.params == LLAMA3_8B_PARAMS and shape.layers == 32 and shape.kv == 1024
    assert shape.largest_module == 128256 * 4096  # the embedding, bigger than a decoder layer
    states = ("params (partition)", "grads (partition)", "optimizer (fp32 master, m, v)")
    assert sum(eight.terms[k] for k in states) == pytest.approx(16 * LLAMA3_8B_PARAMS / 8)  # bf16: 2 + 2 + 12
    sixteen = plan_memory(cfg, 16, shape)
    for key in eight.terms:
        expected = eight.terms[key] / 2 if key in (*states, "optimizer step buffers") else eight.terms[key]
        assert sixteen.terms[key] == pytest.approx(expected), key
    assert eight.checkpoint_bytes == 14 * LLAMA3_8B_PARAMS


def test_full_logits_cost_vocabulary_times_tokens_and_the_chunked_loss_does_not(tmp_path):
    _, _, chunked = planned(tmp_path)
    _, _, full = planned(tmp_path, model={"chunked_loss": False})
    assert full.terms["logits / loss"] == 14 * 2 * 4096 * 128256  # bf16 logits + 3 fp32 copies, 2 rows
    assert chunked.terms["logits / loss"] < full.terms["logits / loss"] / 8


def test_replay_kl_keeps_no_replay_logits_and_its_teacher_holds_the_replay_rows_hidden_states(tmp_path):
    """The example config's replay (kl, 64 samples of 512 a step: 2 a micro-batch here) through the head loss."""
    kl = {"strategy": "kl", "weight": 1.5, "ce_weight": 0.0, "samples_per_step": 64}
    _, shape, with_kl = planned(tmp_path, replay=kl)
    _, _, with_ce = planned(tmp_path, replay={"strategy": "ce", "samples_per_step": 64})
    _, _, with_kd = planned(tmp_path, kd={"weight": 1.0})
    assert with_kl.terms["logits / loss"] == with_ce.terms["logits / loss"]  # no [R, L, V] logits on top
    assert "KD teacher" not in with_ce.terms
    task_tokens, replay_tokens = 2 * 4096, 2 * 512
    # the same teacher (partition, gathered module, head weight), on the replay rows instead of the task rows
    assert with_kl.terms["KD teacher"] - with_kd.terms["KD teacher"] == 2 * shape.hidden * (replay_tokens - task_tokens)
    # packed behind the task rows (a row of 4096 holding the 2 samples), the model's replay activations are the
    # packed row's; the teacher still scores the 2 samples in their own padded forward
    _, _, joint = planned(tmp_path, replay={**kl, "forward": "joint"})
    assert joint.terms["activations"] > with_kl.terms["activations"]
    assert joint.terms["KD teacher"] == with_kl.terms["KD teacher"]


def test_lora_trains_the_adapters_states_only_and_its_teacher_is_the_base_itself(tmp_path):
    """LoRA r 16 on every linear layer of Llama-3-8B: r (in + out) per projection, 81920 r a layer."""
    kl = {"strategy": "kl", "weight": 1.5, "ce_weight": 0.0, "samples_per_step": 64}
    _, full_shape, full = planned(tmp_path, replay=kl)
    _, shape, lora = planned(tmp_path, replay=kl, adapter={"kind": "lora", "r": 16})
    assert shape.trained == 32 * 81920 * 16 and full_shape.trained == LLAMA3_8B_PARAMS
    assert shape.params > LLAMA3_8B_PARAMS  # the adapters' weights are partitioned with the base's
    assert lora.terms["grads (partition)"] == 2 * shape.trained / 8
    assert lora.terms["optimizer (fp32 master, m, v)"] == 12 * shape.trained / 8
    assert lora.checkpoint_bytes == 14 * shape.trained
    # the teacher is the trained model with its adapters off: its outputs on the replay rows (2 of 512 tokens a
    # micro-batch) and the head weight, no partition or gathered module of its own
    assert lora.terms["KD teacher"] == 2 * (2 * 512) * 4096 + 2 * 128256 * 4096
    assert full.terms["KD teacher"] - lora.terms["KD teacher"] > 2 * (LLAMA3_8B_PARAMS / 8 + full_shape.largest_module)
    assert lora.terms["activations"] > full.terms["activations"]  # each adapter keeps A's output per token
    # at least the full run's gradient and optimizer partitions of the base's weights are saved
    assert sum(full.terms.values()) - sum(lora.terms.values()) > 14 * (LLAMA3_8B_PARAMS - shape.trained) / 8


def test_an_8b_run_without_checkpointing_does_not_fit_and_the_advice_makes_it_fit(tmp_path):
    cfg, shape, plan = planned(tmp_path, kd={"weight": 0.5}, batch={"micro_batch": 4})
    advice = advise(plan, cfg, 80 * GB, shape)
    assert plan.total > HEADROOM * 80 * GB
    assert any("gradient_checkpointing: true" in a for a in advice)
    cfg, shape, fixed = planned(
        tmp_path, kd={"weight": 0.5}, batch={"micro_batch": 4}, model={"gradient_checkpointing": True}
    )
    assert fixed.total <= HEADROOM * 80 * GB and advise(fixed, cfg, 80 * GB, shape) == []


def test_offloading_the_optimizer_moves_its_states_to_host_memory(tmp_path):
    _, _, on_gpu = planned(tmp_path)
    raw = yaml.safe_load(config(tmp_path).read_text())
    raw["deepspeed"] = str(ROOT / "ds_configs" / "zero3_offload.json")
    (tmp_path / "offload.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_train_config(tmp_path / "offload.yaml")
    shape = model_shape(cfg, cuda=True)
    offloaded = plan_memory(cfg, 8, shape)
    assert offloaded.terms["optimizer (fp32 master, m, v)"] == offloaded.terms["params (partition)"] == 0
    assert offloaded.host == {
        "params (partition)": on_gpu.terms["params (partition)"],
        "optimizer (fp32 master, m, v)": on_gpu.terms["optimizer (fp32 master, m, v)"],
    }


def test_the_cli_prints_the_table_the_verdict_and_a_comparable_last_line(tmp_path, capsys):
    assert main(["--config", str(config(tmp_path, batch={"micro_batch": 4})), "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "| **total** |" in "\n".join(out) and any(line.startswith("verdict: does not fit") for line in out)
    assert out[-1].startswith("per_rank_gb=") and "fits=0" in out[-1]
