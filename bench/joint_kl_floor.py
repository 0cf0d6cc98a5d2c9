"""The KL floor of replay KL in the task rows' forward (``replay.forward: joint``), against one step's KL.

The ``kl`` strategy compares the student's states on the replay samples with the frozen teacher's, which
scores them padded, in their own forward. Packed behind the task rows, the student's states come from other
GEMM and attention shapes. On CPU they are the padded forward's bit for bit where each sample fills a row or
its slots are short (tests/test_joint_replay.py); with several slots of 128 tokens or more in a row they
differ by fp32 rounding (this bench's defaults: 4 slots of 256). On a GPU, kernels are chosen by shape. So
the KL starts at a rounding floor, and ``replay.forward: auto`` keeps kl samples in their own forward on a
GPU until that floor is measured there. This measures it: the floor is harmless if it is small beside the KL
one training step makes.

Per seed (init, tokens), one model is built in fp32, and teacher and student are copies of it in ``--dtype``:

    own forward, start     the student's padded forward against the teacher's (same shapes: expect 0)
    joint forward, start   the student's packed states against the teacher's padded ones: the floor (|KL|:
                           at this size the KL sum's own rounding can make it negative)
    own forward, 1 step    after one AdamW step at ``--lr`` on the task rows (fp32 master weights, as
                           ZeRO-3's bf16 mode keeps them): the smallest KL training gives the loss to act on

Each KL is the mean over replay tokens, through the chunked head loss that training uses. bench/gpu_checks.sh
runs it on one GPU in bf16 at Llama-3.2-1B's shape; GPU_CHECKS_SMOKE runs it on the CPU at a toy size. On a GPU
``auto`` packs samples only with flash attention's varlen path, since sdpa's masked kernels make a sample's
states depend on its slot; the device image has no flash-attn, so the check measures sdpa, an upper bound that
adds that dependence to the GEMMs' rounding. ``--attn flash_attention_2`` measures what ``auto`` would pack.

    python -m bench.joint_kl_floor                                        # tiny shape on the CPU
    python -m bench.joint_kl_floor --device cuda --dtype bfloat16 --model 1b
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
from typing import Any

import torch

from bench.harness import finish, table
from bench.train_step import MODELS
from cpt_core.logs import setup_logging
from pipeline.gere.joint import ReplayLayout, filler_task_rows, joint_hidden
from pipeline.losses.head import HeadLoss, final_hidden, frozen_head_weight
from pipeline.losses.replay import ReplayInputs, kl_from_hidden
from pipeline.runtime.model import ModelSource, load_causal_lm

log = logging.getLogger("bench.joint_kl_floor")


def replay_batch(samples: int, replay_len: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of varied length (full, 3/4, 1/2, ...), right-padded with 0 as the replay shard stores them."""
    ids = torch.zeros((samples, replay_len), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i in range(samples):
        n = max(replay_len - i * replay_len // 4, replay_len // 4)
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def kl_against(student: Any, hidden: torch.Tensor, teacher: ReplayInputs, teacher_weight: torch.Tensor) -> float:
    """Mean KL per replay token of the student's states ``hidden`` against the teacher's padded forward."""
    with torch.no_grad():
        _, _, kl = kl_from_hidden(HeadLoss(student), hidden, teacher, teacher_weight, 1.0, 0.0, 1.0)
    return float(kl)


def one_seed(args: argparse.Namespace, seed: int) -> dict[str, float]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = {**MODELS[args.model], "vocab_size": args.vocab}
    with device:  # built on the device: a 1B model's seeded init on one CPU thread takes ~13 s
        master = load_causal_lm(ModelSource(config=shape, seed=seed), attn_implementation=args.attn)
    teacher = copy.deepcopy(master).to(dtype).eval()
    student = copy.deepcopy(master).to(dtype).eval()  # eval: no dropout, as Llama's is 0 anyway

    g = torch.Generator().manual_seed(seed)
    ids, mask = (t.to(device) for t in replay_batch(args.samples, args.replay_len, args.vocab, g))
    task = torch.randint(4, args.vocab, (args.task_rows, args.seq_len), generator=g).to(device)
    _, positions = filler_task_rows(args.task_rows, args.seq_len, device)  # two documents a row, as training's
    layout = ReplayLayout(args.replay_len, args.seq_len)

    with torch.no_grad():  # the teacher's padded forward, once: every KL below is against it
        scored = ReplayInputs(ids, mask, teacher_hidden=final_hidden(teacher, input_ids=ids, attention_mask=mask))
        head = frozen_head_weight(teacher)
        own = kl_against(student, final_hidden(student, input_ids=ids, attention_mask=mask), scored, head)
        _, packed = joint_hidden(student, task, positions, ids, layout, args.attn)
        joint = kl_against(student, packed, scored, head)

    master.train()
    optimizer = torch.optim.AdamW(master.parameters(), lr=args.lr, weight_decay=0.0)
    master(input_ids=task, position_ids=positions, labels=task).loss.backward()
    optimizer.step()
    stepped = master.to(dtype).eval()  # the fp32 master weights, cast as the engine casts them after a step
    with torch.no_grad():
        step = kl_against(stepped, final_hidden(stepped, input_ids=ids, attention_mask=mask), scored, head)
    return {"own": own, "joint": joint, "step": step}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{mean:.3g}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny", help="from-config Llama shape")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (flash_attention_2 where installed)")
    p.add_argument("--seq-len", type=int, default=1024, help="task row length; the samples pack into such rows")
    p.add_argument("--replay-len", type=int, default=256)
    p.add_argument("--samples", type=int, default=4, help="replay samples (one packed row at the defaults)")
    p.add_argument("--task-rows", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-5, help="the one step's lr (the issue's CPT lr)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    setup_logging(brief=True)

    runs = []
    for seed in args.seeds:
        runs.append(one_seed(args, seed))
        log.info("seed %d: %s", seed, {k: f"{v:.3g}" for k, v in runs[-1].items()})
    # |KL|: at the floor the KL sum's own rounding can make it negative, and a signed mean over seeds cancels
    own, joint, step = ([abs(r[k]) for r in runs] for k in ("own", "joint", "step"))
    ratio = [j / s if s > 0 else float("nan") for j, s in zip(joint, step)]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    per_seed = " ".join(f"{r['joint']:.2g}" for r in runs)
    print(
        f"\n{where}, {args.dtype}, model {args.model} (vocab {args.vocab}), attn {args.attn}, {args.samples} replay "
        f"samples of <= {args.replay_len} tokens packed into rows of {args.seq_len} behind {args.task_rows} task "
        f"rows, seeds {' '.join(map(str, args.seeds))}; KL: |mean per replay token| against the teacher's "
        f"padded forward, mean ± std over seeds; per seed, packed at the start: "
        f"{per_seed}\n"
    )
    cells = [
        ("own padded forward, at the start", spread(own), spread([o / s for o, s in zip(own, step)])),
        ("packed in the task rows' forward, at the start", spread(joint), spread(ratio)),
        (f"own padded forward, after one step at lr {args.lr:g}", spread(step), "1"),
    ]
    print(table(("student's states", "KL", "vs one step's KL"), cells))
    figures = {
        "joint_kl_floor": statistics.fmean(joint),
        "one_step_kl": statistics.fmean(step),
        "floor_vs_step": statistics.fmean(ratio),
        "device": args.device,
        "dtype": args.dtype,
        "seeds": len(runs),
    }
    finish("joint_kl_floor", figures, {"per_seed": runs})


if __name__ == "__main__":
    main()
