"""The memory planner on a Llama-3-8B config: exact parameter count, ZeRO-3 scaling, verdicts and advice.

Its agreement with measured peak memory is checked on a real run in ``test_real_models.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
    assert eight.checkpoint_bytes == 12 * LLAMA3_8B_PARAMS  # DeepSpeed's fp32 master, m and v; no bf16 weights


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
    assert lora.checkpoint_bytes == 12 * shape.trained
    # the teacher is the trained model with its adapters off: its outputs on the replay rows (2 of 512 tokens a
    # micro-batch) and the head weight, no partition or gathered module of its own
    assert lora.terms["KD teacher"] == 2 * (2 * 512) * 4096 + 2 * 128256 * 4096
    assert "KD teacher (partition)" not in lora.terms
    assert full.terms["KD teacher (partition)"] == 2 * full_shape.params / 8
    assert full.terms["KD teacher"] - lora.terms["KD teacher"] == 2 * (full_shape.largest_module + 5e8)  # + prefetch
    assert lora.terms["activations"] > full.terms["activations"]  # each adapter keeps A's output per token
    # at least the full run's gradient and optimizer partitions of the base's weights are saved
    assert full.total - lora.total > 14 * (LLAMA3_8B_PARAMS - shape.trained) / 8


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
    assert offloaded.terms["grads (partition)"] == 0 and "optimizer step buffers" not in offloaded.terms
    assert offloaded.host == {
        "params (partition)": on_gpu.terms["params (partition)"],
        "grads (partition)": on_gpu.terms["grads (partition)"],
        "optimizer (fp32 master, m, v)": on_gpu.terms["optimizer (fp32 master, m, v)"],
        "fp32 grads": 4 * LLAMA3_8B_PARAMS / 8,
    }


def test_the_cli_prints_the_table_the_verdict_and_a_comparable_last_line(tmp_path, capsys):
    assert main(["--config", str(config(tmp_path, batch={"micro_batch": 4})), "--gpus", "8", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "| **total** |" in "\n".join(out) and any(line.startswith("verdict: does not fit") for line in out)
    assert out[-1].startswith("per_rank_gb=") and "fits=0" in out[-1]


LLAMA3_70B = {
    **LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}


def test_deepspeed_steps_one_sub_group_at_a_time_so_the_step_buffers_do_not_scale_with_the_partition(tmp_path):
    """Llama-3-70B on 8 GPUs: 8.8e9 parameters a rank, stepped in sub-groups of 1e9 (sub_group_size)."""
    _, shape, plan = planned(tmp_path, model={"config": LLAMA3_70B})
    per_rank = shape.params / 8
    assert 8.5e9 < per_rank < 9e9
    sub_group = 1e9 + shape.largest_param / 8  # a sub-group closes once it reaches 1e9: one tensor's partition over
    assert plan.terms["optimizer step buffers"] == pytest.approx(8 * sub_group)  # fp32 grad + AdamW's temporary
    assert plan.terms["optimizer step buffers"] < 8 * per_rank / 7.5  # the partition-sized buffers were ~8x this
    _, _, small = planned(tmp_path)  # 8B: 1e9 a rank fits one sub-group, which is the whole partition
    assert small.terms["optimizer step buffers"] == pytest.approx(8 * LLAMA3_8B_PARAMS / 8)


@pytest.mark.parametrize("kind, anchors", [("l2sp", 4), ("ewc", 8), ("none", 0)])
def test_penalties_keep_fp32_anchors_of_the_local_partition(tmp_path, kind, anchors):
    _, _, plan = planned(tmp_path, penalty={"kind": kind, "weight": 0.1})
    assert plan.terms.get("penalty anchors", 0) == anchors * LLAMA3_8B_PARAMS / 8  # start weights (+ EWC's Fisher)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_activation_term_is_what_autograd_saves_of_a_llama_block(dtype):
    """Bytes autograd keeps per token per decoder layer (parameters excluded, one count per storage), from the
    difference between 2 layers and 1 and between 128 tokens and 64, against the planner's term: in bf16 too,
    where each RMSNorm keeps its input upcast to fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.plan import ModelShape, activation_bytes_per_token

    hidden, intermediate, heads, kv_heads = 192, 1000, 6, 3  # nothing a multiple of another

    def saved(layers: int, tokens: int) -> int:
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config).to(dtype)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in weights:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(0, 128, (1, tokens)), logits_to_keep=1)
        return sum(kept.values())

    def per_layer(tokens: int) -> int:
        return saved(2, tokens) - saved(1, tokens)

    measured = (per_layer(128) - per_layer(64)) / 64
    kv = kv_heads * hidden // heads
    shape = ModelShape(0, 1, hidden, intermediate, kv, heads, 128, 0, 0, True)
    planned_bytes = activation_bytes_per_token(shape, 4 if dtype == torch.float32 else 2)
    # above by the norms' [T, 1] rsqrt and attention's [heads, T] log-sum-exp: 0.1-0.3%
    assert planned_bytes <= measured <= 1.005 * planned_bytes


def test_model_states_agree_with_deepspeeds_estimator_where_both_count_the_same_thing(tmp_path):
    """DeepSpeed's ZeRO-3 estimator (no offload): 4 bytes a parameter of the largest layer + 18 a parameter over
    the ranks. The planner: the largest module's bf16 parameters gathered and its bf16 gradient, 4 bytes a
    parameter as DeepSpeed; 16 a parameter of model states (bf16 params and grads, fp32 master, m and v). The
    2 more of DeepSpeed's are an allowance for the fp32 gradient of the step (its stage 1/2 estimator lists a
    4-byte fp32 gradient in its 18), which the planner counts in full as a step buffer of one sub-group (4
    bytes a parameter at 8B on 8 GPUs, where one sub-group is the partition). The planner adds the prefetch
    and reduce buckets, which the estimator leaves out."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, shape, plan = planned(tmp_path)
    psi, t = shape.params, plan.terms
    _, gpu, largest = estimate_zero3_model_states_mem_needs(psi, shape.largest_module, 8, 1, False, False)
    prefetch = 5e8  # zero3_bf16.json's stage3_prefetch_bucket_size
    assert shape.largest_module + prefetch > 1e9  # so the planner's gathered term is that module and the prefetch
    assert t["gathered weights"] - 2 * prefetch + t["full grad of the largest module"] == largest
    states = t["params (partition)"] + t["grads (partition)"] + t["optimizer (fp32 master, m, v)"]
    assert states == 16 * psi / 8 and gpu - largest == int(18 * psi / 8)
    assert states + t["optimizer step buffers"] / 2 >= gpu - largest  # + the fp32 gradient: DeepSpeed's 18 and more

    # Both offloaded (zero3_offload.json): DeepSpeed's GPU term is the largest layer alone, as the planner's
    # without its buckets; on the host it counts 18 a parameter (bf16 params, fp32 master, m, v and gradient),
    # the planner 2 more: the bf16 gradient partition DeepSpeed keeps in pinned host memory under offload.
    raw = yaml.safe_load(config(tmp_path).read_text())
    raw["deepspeed"] = str(ROOT / "ds_configs" / "zero3_offload.json")
    (tmp_path / "offload.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_train_config(tmp_path / "offload.yaml")
    offloaded = plan_memory(cfg, 8, model_shape(cfg, cuda=True))
    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(psi, shape.largest_module, 8, 1, True, True)
    o = offloaded.terms
    assert 2 * shape.largest_module + o["full grad of the largest module"] == gpu
    # the planner keeps what ZeRO-3 holds for backward: up to stage3_max_reuse_distance (1e9) parameters
    assert o["gathered weights"] == 2 * max(shape.largest_module + 2e8, 1e9)
    assert sum(offloaded.host.values()) * 8 == pytest.approx(cpu / 1.5 + 2 * psi)  # 1.5: its buffer factor


def test_a_run_file_that_merges_to_a_budget_plans_the_merge_steps_memory(tmp_path, capsys):
    """Llama-3-8B in bf16: the α search keeps the tuned and the base weights on the host (32 GB) and scores on
    one GPU, which holds a bf16 model and a forward's logits; the streamed write holds three 5 GB shards and
    one tensor's fp32 copies. On the CPU the model scored is an fp32 copy on the host too."""
    from transformers import LlamaConfig

    from data_prep.build import BuildOptions

    LlamaConfig(**LLAMA3_8B).save_pretrained(tmp_path / "base")
    run = tmp_path / "run.yaml"
    sources = [{"name": "d", "role": "domain", "paths": "d.jsonl"}, {"name": "g", "role": "general", "paths": "g"}]
    run.write_text(
        yaml.safe_dump(
            {
                "model": {"path": str(tmp_path / "base"), "dtype": "bfloat16"},
                "steps": 10,
                "data": {"sources": sources, "replay": {"probe_docs": 64}},
                "merge": {"to_budget": 0.05},
            }
        )
    )
    vocab, psi = LLAMA3_8B["vocab_size"], LLAMA3_8B_PARAMS
    logits, row = 4096 * vocab, min(BuildOptions().seq_len, 4096) * vocab
    largest = vocab * LLAMA3_8B["hidden_size"]
    write = 3 * 5e9 + 12 * largest
    assert main(["--config", str(run), "--gpus", "8"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    line = next(line for line in out if line.startswith("merge step:"))
    assert f"the α search {2 * 2 * psi / GB:.1f} GB" in line and f"the streamed write {write / GB:.1f} GB" in line
    gpu = 2 * (psi + logits) + 8 * row + 12 * largest
    assert any(line.endswith(f"scores on one GPU: {gpu / GB:.1f} GB there") for line in out)
    assert out[-1].endswith(f"merge_host_gb={max(4 * psi, write) / GB:.1f}")
    assert main(["--config", str(run), "--gpus", "8", "--cpu"]) == 0  # the bf16 sets and an fp32 model scored
    cpu = capsys.readouterr().out.strip().splitlines()[-1]
    assert cpu.endswith(f"merge_host_gb={(2 * 2 * psi + 4 * (psi + logits + row)) / GB:.1f}")
