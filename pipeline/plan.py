"""Memory planner: will this training config fit, per rank, and what to change if not.

    python -m pipeline.plan --config cpt.yaml --gpus 8 [--nodes 4] [--gpu-mem 80] [--disk-gbps 2]

From the config alone (the model is built on the meta device: exact parameter
counts, no weights read), per rank, in bytes:

    model states   ZeRO-3 partitions of params (b), grads (b), fp32 master copy
                   and Adam m, v (12): (2b + 12)·ψ / ranks. offload_optimizer moves
                   the grads and the 12 to host memory, beside an fp32 gradient
                   (4); offload_param moves the params'
    gathered       ZeRO-3's working set: the weights it keeps gathered, the
                   reduce bucket, and the largest module's full gradient.
                   ZeRO-3 releases a module's weights after use only if the
                   trace does not use them again within
                   stage3_max_reuse_distance (1e9) parameters, and backward
                   uses each weight again: the whole model stays gathered while
                   it is under about half that distance (SmolLM2: 89% of it at
                   once in full training, all of it with LoRA), less than the
                   distance above it. The plan counts min(ψ, distance), never
                   less than the largest module (a decoder layer, or the V×H
                   embedding/head) plus the prefetch bucket
    step buffers   the fp32 gradient DeepSpeed hands the optimizer and torch
                   AdamW's temporary, (4 + 4) bytes a parameter of one optimizer
                   sub-group (zero_optimization.sub_group_size, 1e9), not of the
                   whole partition: DeepSpeed steps one sub-group at a time
    anchors        L2-SP's fp32 copy of the start weights (4·ψ / ranks), EWC's
                   and its Fisher (8·ψ / ranks)
    activations    what backward keeps of each decoder layer, per token, for a
                   Llama-style block with flash/sdpa attention (no L² scores):
                   b·(6H + 2·kv + 4I) + 4·2H: eight H-wide tensors, of which
                   the two RMSNorm inputs are kept in fp32 (the norm upcasts
                   before it normalizes), k, v and four MLP tensors
                   (tests/test_plan.py counts the saved tensors of a Llama
                   block; eager attention adds its [heads, L, L] scores and
                   probabilities); with
                   gradient checkpointing only the layer input per layer plus one
                   layer recomputed. Task rows (micro_batch × seq_len) and, when
                   replay runs, the replay rows of the micro-batch, whose graph is
                   alive at the same backward (packed into rows of seq_len with
                   replay.forward joint, and recomputed with the task rows)
    logits/loss    chunked head loss: 4 fp32 chunks + the head weight's gradient
                   per head-loss call (task, replay); full logits: b + 3 fp32
                   copies of [tokens, V] for task and replay rows
    KD teacher     its parameter partition, hidden states (chunked) or logits on
                   the rows it teaches (task rows for KD, replay rows for the kl
                   strategy), and its head weight gathered once

With LoRA (``adapter``) grads, optimizer states, step buffers and the
checkpoint count the adapters' parameters only, activations add what each
adapter keeps per token, and the teacher is the base itself (no partition).

``b`` is 2 (bf16) or 4 (fp32). The total is the model states and anchors plus
the larger of the optimizer step's buffers and the forward/backward working set
(gathered weights, activations, logits, the teacher's outputs): the step runs
after backward has freed the latter. The CUDA context (~0.5-1 GB) and the
caching allocator's slack are not counted; the verdict keeps 10% of the GPU for them.
The trainer logs what this predicts, measured: ``peak_mem_gb`` in
metrics.jsonl (tests compare the two on CPU runs). Checkpoint: 12·ψ bytes on
disk (DeepSpeed's optimizer partitions; ZeRO-3's model-states files hold no
weights); the time a save needs at ``--disk-gbps`` is compared with
``checkpoint.signal_save_budget``.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM
from transformers.utils.hub import convert_file_size_to_int

from cpt_core.errors import UserError, run_cli
from cpt_core.logs import setup_logging
from data_prep.prep_dir import PrepDir
from data_prep.replay import ReplayShard

from .cli_args import plan_parser
from .config import TrainConfig, load_train_config
from .evaluation.perplexity import TOKENS_PER_FORWARD
from .gere.joint import replay_layout
from .gere.sampler import replay_plan
from .losses.head import loss_from_hidden
from .losses.linear_ce import CHUNK_BYTES
from .runfile import MergeSection, prep_lengths, run_file
from .runtime.ds_config import filled_ds_config
from .runtime.ds_json import decoupled_writer, read_ds_json
from .runtime.model import model_config, model_sources
from .runtime.precision import resolve_dtype
from .training.adapter import add_adapters, lora_layers, uses_adapter

log = logging.getLogger("pipeline.plan")

GB = 1e9
HEADROOM = 0.9  # of GPU memory the plan may use; the rest is CUDA context and allocator slack


@dataclass
class ModelShape:
    params: int  # ψ, tied weights once
    layers: int
    hidden: int
    intermediate: int
    kv: int  # key/value width: kv heads × head dim
    heads: int
    vocab: int
    largest_module: int  # parameters of the largest module gathered whole (a layer, or the embedding)
    largest_param: int  # parameters of the largest tensor (a sub-group can pass sub_group_size by its partition)
    loss_from_hidden: bool  # the run's loss skips full logits (pipeline.losses.head)
    trained: int = 0  # parameters with gradients and optimizer states: all of them, or the adapters'
    largest_trained: int = 0  # of those, in the largest layer (its full gradient before the reduce-scatter)
    adapter_per_token: int = 0  # values a layer's adapters keep per token for backward (A's outputs, dropout's)

    @classmethod
    def from_config(cls, config: Any, cfg: TrainConfig) -> ModelShape:
        text = config.get_text_config()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
            if uses_adapter(cfg.adapter):
                add_adapters(model, cfg.adapter, cfg.seed)
        layers = max(
            (m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=lambda m: len(m), default=[]
        )
        layer = max((sum(p.numel() for p in block.parameters()) for block in layers), default=0)
        trained_in_layer = max(
            (sum(p.numel() for p in block.parameters() if p.requires_grad) for block in layers), default=0
        )
        embedding = model.get_input_embeddings().weight.numel()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            layers=len(layers),
            hidden=text.hidden_size,
            intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
            kv=kv_heads * head_dim,
            heads=heads,
            vocab=text.vocab_size,
            largest_module=max(layer, embedding),
            largest_param=max((p.numel() for p in model.parameters()), default=0),
            loss_from_hidden=loss_from_hidden(cfg, model),
            trained=sum(p.numel() for p in model.parameters() if p.requires_grad),
            largest_trained=trained_in_layer if uses_adapter(cfg.adapter) else max(layer, embedding),
            adapter_per_token=_adapter_per_token(layers[0], cfg) if uses_adapter(cfg.adapter) and layers else 0,
        )


def _adapter_per_token(layer: torch.nn.Module, cfg: TrainConfig) -> int:
    """What one layer's LoRA modules keep per token for backward: A's output (r values) each, and with dropout
    its own copy of the layer's input (in_features values) each."""
    kept = 0
    for module in lora_layers(layer):
        kept += cfg.adapter.r + (module.in_features if cfg.adapter.dropout > 0 else 0)
    return kept


@dataclass
class Plan:
    ranks: int
    dtype: str
    terms: dict[str, float] = field(default_factory=dict)  # bytes per rank on the device
    host: dict[str, float] = field(default_factory=dict)  # bytes per rank in host memory (offload)
    checkpoint_bytes: float = 0.0
    advice: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)  # what the plan took as given, said with the table
    merge: dict[str, float] = field(default_factory=dict)  # the run file's merge step, by phase (merge_memory)
    seq_len: int = 0  # of the rows planned

    @property
    def total(self) -> float:
        """Peak bytes per rank: what lives all run, plus the step's buffers or the forward/backward working set."""
        kept = sum(v for k, v in self.terms.items() if k in PERSISTENT)
        step = sum(v for k, v in self.terms.items() if k in AT_THE_STEP)
        working = sum(v for k, v in self.terms.items() if k not in PERSISTENT | AT_THE_STEP)
        return kept + max(step, working)


# Terms alive for the whole run, and those alive only at the optimizer step (after backward has freed the
# gathered weights, activations and logits); every other term is the forward/backward working set.
PERSISTENT = frozenset(
    {
        "params (partition)",
        "grads (partition)",
        "optimizer (fp32 master, m, v)",
        "penalty anchors",
        "KD teacher (partition)",
        "reduce bucket",  # with contiguous_gradients, allocated once (stage3.py)
    }
)
AT_THE_STEP = frozenset({"optimizer step buffers"})


def value_bytes(dtype: str) -> int:
    """Bytes of one parameter or activation value in the training dtype (a resolved ``model.dtype``)."""
    return 4 if dtype == "float32" else 2


def model_shape(cfg: TrainConfig, cuda: bool) -> ModelShape:
    """The shape of the model ``cfg`` trains; resolves ``model.dtype: auto`` in ``cfg`` for CUDA or CPU ranks."""
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, cfg.deepspeed, cuda=cuda)
    _, start = model_sources(cfg)
    return ModelShape.from_config(model_config(start), cfg)


def plan_memory(
    cfg: TrainConfig,
    ranks: int,
    shape: ModelShape,
    device_type: str = "cuda",
    lengths: tuple[int, int] | None = None,
) -> Plan:
    """Per-rank memory of ``cfg`` (``model.dtype`` resolved, see :func:`model_shape`) on ``ranks`` ranks of
    ``device_type``; ``lengths``: (seq_len, replay_len) to assume while the prep does not exist yet."""
    dtype = cfg.model.dtype
    b = value_bytes(dtype)
    ds = filled_ds_config(cfg, ranks, shape.hidden)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") != 3:
        raise UserError(f"{cfg.deepspeed}: the planner models ZeRO stage 3 (the pipeline's configs); got {zero}")
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    offload_par = zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    psi, phi = shape.params, shape.trained or shape.params  # all parameters; those trained
    adapter = uses_adapter(cfg.adapter)
    plan = Plan(ranks, dtype)
    t = plan.terms
    t["params (partition)"] = 0.0 if offload_par else b * psi / ranks
    # With offload_optimizer DeepSpeed keeps the gradient partition in (pinned) host memory, beside the fp32
    # gradient it steps with (stage3.py: its device is the CPU then).
    t["grads (partition)"] = 0.0 if offload_opt else b * phi / ranks
    t["optimizer (fp32 master, m, v)"] = 0.0 if offload_opt else 12 * phi / ranks
    if offload_par:
        plan.host["params (partition)"] = b * psi / ranks
    if offload_opt:
        plan.host["grads (partition)"] = b * phi / ranks
        plan.host["optimizer (fp32 master, m, v)"] = 12 * phi / ranks
        plan.host["fp32 grads"] = 4 * phi / ranks
    prefetch = zero.get("stage3_prefetch_bucket_size", 0.9 * shape.hidden**2)
    reduce = zero.get("reduce_bucket_size", shape.hidden**2)
    reused = min(psi, zero.get("stage3_max_reuse_distance", 1e9))  # kept for their use in backward
    t["gathered weights"] = b * max(shape.largest_module + prefetch, reused)
    t["reduce bucket"] = b * reduce
    t["full grad of the largest module"] = b * (shape.largest_trained or shape.largest_module)  # before reduce
    if not offload_opt:
        # DeepSpeed flattens a sub-group's gradient into a new fp32 tensor for its step and frees it after
        # (stage3.py: _prepare_sub_group, _release_sub_group); torch's AdamW (used when the JSON names no
        # optimizer) adds a temporary of that size. A sub-group closes once it reaches sub_group_size, so it can
        # pass it by one parameter's partition. Alive at the step only (Plan.total).
        torch_adamw = "optimizer" not in ds
        sub_group = zero.get("sub_group_size", 1e9) + shape.largest_param / ranks
        t["optimizer step buffers"] = (4 + (4 if torch_adamw else 0)) * min(phi / ranks, sub_group)
    if cfg.penalty.kind != "none":  # the start weights' fp32 partition, and EWC's Fisher beside it
        # cloned from the fp32 master partition, so they sit where the optimizer does
        anchors = (4 if cfg.penalty.kind == "l2sp" else 8) * phi / ranks
        (plan.host if offload_opt else t)["penalty anchors"] = anchors

    seq_len, replay_len = _lengths(cfg, plan, lengths)
    plan.seq_len = seq_len
    tokens = cfg.batch.micro_batch * seq_len
    chunked = shape.loss_from_hidden
    layout = replay_layout(cfg, replay_len, seq_len, ranks, chunked, device_type)
    replay_tokens = samples = 0
    if cfg.replay.strategy != "none":
        samples, _ = replay_plan(cfg.replay.samples_per_step, ranks, cfg.batch.grad_accum)  # padded rows too
        # joint: packed rows of seq_len tokens behind the task rows, in the same forward
        replay_tokens = layout.rows_for(samples) * seq_len if layout else samples * replay_len
    per_token_layer = activation_bytes_per_token(shape, b)
    per_token_all = per_token_layer * shape.layers
    live = tokens + replay_tokens
    if cfg.model.gradient_checkpointing:  # one layer recomputed at a time, for the largest forward
        largest = live if layout else max(tokens, replay_tokens)
        t["activations"] = b * shape.hidden * shape.layers * live + per_token_layer * largest
    else:
        t["activations"] = per_token_all * live
    if adapter:  # recomputed with the layer under gradient checkpointing, kept with it otherwise
        t["activations"] += (
            b * shape.adapter_per_token * live * (1 if cfg.model.gradient_checkpointing else shape.layers)
        )
    if cfg.model.attn_implementation == "eager":  # scores and probabilities, [heads, L, L] a row and layer
        rows = cfg.batch.micro_batch + (layout.rows_for(samples) if layout else 0)
        kept = 1 if cfg.model.gradient_checkpointing else shape.layers
        t["activations"] += 2 * b * shape.heads * kept * rows * seq_len**2
    head_calls = 2 if replay_tokens else 1  # task and replay each keep a [V, H] head gradient until backward
    if chunked:
        chunk_tokens = min(max(tokens, replay_tokens), max(1, CHUNK_BYTES // (shape.vocab * 4)))
        # (the kl replay strategy too: its KL runs through the head loss from both models' hidden states)
        t["logits / loss"] = 4 * 4 * chunk_tokens * shape.vocab + head_calls * b * shape.vocab * shape.hidden
    else:  # both forwards' logits are alive at the backward
        t["logits / loss"] = (b + 12) * (tokens + replay_tokens) * shape.vocab
    replay_kl = cfg.replay.strategy == "kl"
    if cfg.kd.weight > 0 or replay_kl:
        # the teacher's outputs; on the replay samples it runs their own padded forward in either layout
        taught = (tokens if cfg.kd.weight > 0 else 0) + (samples * replay_len if replay_kl else 0)
        # an adapter run's teacher is its own base with the adapters off: no weights of its own. A separate
        # teacher's trace is its forward alone, so ZeRO-3 releases each of its modules after use; its DeepSpeed
        # config keeps the trained model's offload_param.
        teacher = 0.0
        if not adapter:
            (plan.host if offload_par else t)["KD teacher (partition)"] = b * psi / ranks
            teacher = b * (shape.largest_module + prefetch)
        teacher += b * taught * shape.hidden + b * shape.vocab * shape.hidden if chunked else b * taught * shape.vocab
        t["KD teacher"] = teacher
    plan.checkpoint_bytes = 12 * phi  # an adapter run's checkpoints leave out the frozen weights
    return plan


def merge_memory(
    merge: MergeSection,
    shape: ModelShape,
    dtype_bytes: int,
    seq_len: int,
    max_shard_size: str,
    adapter: bool,
    cuda: bool,
) -> dict[str, float]:
    """Memory of the run file's merge step (one process), by phase: ``search`` and ``write`` in host memory (the
    peak is the larger), ``search_gpu`` on the GPU where the search runs on one.

    ``to_budget`` keeps the tuned and the base weights on the host in the export's dtype and scores each α with
    one model: on a GPU in that dtype, beside one tensor's fp32 copies for the lerp; on the CPU in fp32. A forward
    holds logits of up to TOKENS_PER_FORWARD tokens, and the cross-entropy one row's in fp32 and its log-softmax.
    The write streams: a shard of the export, the base's tensors of that shard and their merge, in the export's
    dtype, and fp32 copies of the three for the tensor being merged."""
    weights = shape.params - (shape.trained if adapter else 0)  # an export holds the adapters merged in
    shard = min(float(convert_file_size_to_int(max_shard_size)), dtype_bytes * weights)
    phases = {"write": 3 * shard + 3 * 4 * shape.largest_param}
    if merge.to_budget is None:
        return phases
    logits, row = TOKENS_PER_FORWARD * shape.vocab, min(seq_len, TOKENS_PER_FORWARD) * shape.vocab
    phases["search"] = 2 * dtype_bytes * weights
    if cuda:
        phases["search_gpu"] = dtype_bytes * (weights + logits) + 2 * 4 * row + 3 * 4 * shape.largest_param
    else:
        phases["search"] += 4 * (weights + logits + row)
    return phases


def host_peak(merge: dict[str, float]) -> float:
    """The merge step's peak host memory: the larger of its search and its write."""
    return max(v for k, v in merge.items() if k != "search_gpu")


def activation_bytes_per_token(shape: ModelShape, b: int) -> int:
    """What backward keeps of one decoder layer per token (flash/sdpa attention; ``b``: bytes of the dtype).

    Eight H-wide tensors, k, v and four MLP tensors in the dtype, except the inputs of the layer's two
    RMSNorms: the norm computes in fp32 and keeps its upcast input for backward (in bf16 too).
    """
    return b * (6 * shape.hidden + 2 * shape.kv + 4 * shape.intermediate) + 4 * 2 * shape.hidden


def advise(plan: Plan, cfg: TrainConfig, gpu_bytes: float, shape: ModelShape) -> list[str]:
    """What to change, cheapest first, when the plan does not fit."""
    budget = HEADROOM * gpu_bytes
    if plan.total <= budget:
        return []
    t, advice = plan.terms, []
    over = plan.total - budget
    if not shape.loss_from_hidden and t["logits / loss"] > 0.1 * plan.total:
        advice.append("model.chunked_loss: true (full-vocabulary logits are a large share)")
    if not cfg.model.gradient_checkpointing and t["activations"] > 0.2 * plan.total:
        advice.append("model.gradient_checkpointing: true (activations shrink to one tensor a layer)")
    if cfg.batch.micro_batch > 1 and t["activations"] > over:
        per_row = t["activations"] / cfg.batch.micro_batch
        fit_rows = max(1, cfg.batch.micro_batch - math.ceil(over / per_row))
        advice.append(f"batch.micro_batch: {fit_rows} (raise batch.grad_accum to keep the global batch)")
    states = sum(v for k, v in t.items() if k in PERSISTENT - {"reduce bucket"})  # what more ranks divide
    if t["optimizer (fp32 master, m, v)"] > 0 and t["optimizer (fp32 master, m, v)"] > 0.3 * plan.total:
        advice.append("offload_optimizer to cpu in the DeepSpeed JSON (Adam and the fp32 copy move to host memory)")
    rest = plan.total - states
    if rest < budget:
        needed = math.ceil(states * plan.ranks / (budget - rest))
        if needed > plan.ranks:
            advice.append(f"at least {needed} GPUs (model states are {states * plan.ranks / GB:.0f} GB in all)")
    if not advice:
        advice.append("nothing in the config fits this GPU: use a smaller model or a larger GPU")
    return advice


def _lengths(cfg: TrainConfig, plan: Plan, declared: tuple[int, int] | None) -> tuple[int, int]:
    """(seq_len, replay_len) from the prep; before data_prep has run, what the run file asks for (``declared``),
    else a long-context guess (either noted in the plan)."""
    try:
        prep = PrepDir(cfg.data.prep).read()
    except (UserError, OSError):
        seq_len, replay_len = declared or (4096, 512)
        source = "the run file's data section" if declared else "assumed"
        plan.assumed.append(f"no prep at {cfg.data.prep} yet: seq_len {seq_len}, replay_len {replay_len} ({source})")
        return seq_len, replay_len
    if prep.replay is None:
        return prep.seq_len, 512
    return prep.seq_len, ReplayShard.open(prep.replay).replay_len


def render(plan: Plan, gpu_bytes: float | None, disk_gbps: float, save_budget: float, background: bool) -> str:
    """The plan as a table; ``background``: the DeepSpeed JSON has saves written by writer processes."""
    lines = [f"per rank, {plan.ranks} ranks, {plan.dtype}", *plan.assumed, "", "| memory | GB per rank |", "|---|---:|"]
    for name, value in plan.terms.items():
        lines.append(f"| {name} | {value / GB:.2f} |")
    lines.append(f"| **total** | **{plan.total / GB:.2f}** |")
    if plan.host:
        lines.append(f"| host memory (offload) | {sum(plan.host.values()) / GB:.2f} |")
    if AT_THE_STEP & plan.terms.keys():
        lines.append("(the total counts the step's buffers or the forward/backward working set, the larger: not both)")
    lines.append("")
    if plan.merge:
        phases = [f"the streamed write {plan.merge['write'] / GB:.1f} GB"]
        if "search" in plan.merge:
            held = "the tuned and the base weights" + ("" if "search_gpu" in plan.merge else ", the fp32 model scored")
            phases.insert(0, f"the α search {plan.merge['search'] / GB:.1f} GB ({held})")
        lines.append(
            f"merge step: {host_peak(plan.merge) / GB:.1f} GB of host memory at its peak: " + ", then ".join(phases)
        )
        if "search_gpu" in plan.merge:
            lines.append(f"  its α search scores on one GPU: {plan.merge['search_gpu'] / GB:.1f} GB there")
    if gpu_bytes:
        fits = plan.total <= HEADROOM * gpu_bytes
        lines.append(
            f"verdict: {'fits' if fits else 'does not fit'} in {gpu_bytes / GB:.0f} GB "
            f"({plan.total / gpu_bytes:.0%} of it; the plan keeps {1 - HEADROOM:.0%} for the CUDA context)"
        )
        lines += [f"  - {a}" for a in plan.advice]
    seconds = plan.checkpoint_bytes / (disk_gbps * GB)
    lines.append(
        f"checkpoint: {plan.checkpoint_bytes / GB:.1f} GB; a save takes ~{seconds:.0f} s at {disk_gbps:g} GB/s"
        + (
            f", above checkpoint.signal_save_budget ({save_budget:.0f} s): a SIGTERM keeps the last checkpoint "
            "instead (raise the launcher's kill timeout and the budget together, or save more often)"
            if seconds > save_budget
            else ""
        )
    )
    if background:
        lines.append(
            "  periodic saves are written in the background (checkpoint.writer): the step after one waits only "
            "for what is left of it, a save at a signal for all of it"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = plan_parser().parse_args(argv)
    setup_logging(logging.WARNING)

    def body() -> None:
        run = run_file(args.config)
        cfg = run.train if run else load_train_config(args.config)
        ranks = args.gpus * args.nodes
        shape = model_shape(cfg, cuda=not args.cpu)
        plan = plan_memory(cfg, ranks, shape, "cpu" if args.cpu else "cuda", prep_lengths(args.config))
        if run and run.merge.enabled:
            adapter, cuda = uses_adapter(cfg.adapter), not args.cpu
            b = value_bytes(cfg.model.dtype)
            plan.merge = merge_memory(run.merge, shape, b, plan.seq_len, run.export.max_shard_size, adapter, cuda)
        gpu_bytes = args.gpu_mem * GB if args.gpu_mem else None
        if gpu_bytes is None and torch.cuda.is_available():
            gpu_bytes = float(torch.cuda.get_device_properties(0).total_memory)
        if gpu_bytes:
            plan.advice = advise(plan, cfg, gpu_bytes, shape)
        background = decoupled_writer(read_ds_json(cfg.deepspeed))
        print(render(plan, gpu_bytes, args.disk_gbps, cfg.checkpoint.signal_save_budget, background))
        fits = int(gpu_bytes is not None and plan.total <= HEADROOM * gpu_bytes)
        merge = f" merge_host_gb={host_peak(plan.merge) / GB:.1f}" if plan.merge else ""
        print(f"per_rank_gb={plan.total / GB:.2f} fits={fits} checkpoint_gb={plan.checkpoint_bytes / GB:.1f}{merge}")

    return run_cli(body, log)


if __name__ == "__main__":
    sys.exit(main())
