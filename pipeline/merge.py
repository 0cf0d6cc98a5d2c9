"""Merge a tuned model back toward its base, after training: θ = θ_base + α (θ_tuned − θ_base).

``--alpha A`` writes one merge. ``--to-budget B`` chooses the largest α whose rise of general
perplexity on the prep's probe documents (set apart from holdout, replay and training; the
forgetting budget's probe) stays within B, by bisection, and reports the probe rise and the domain
gain at each α it tried. ``--average-last K`` averages a run's last K checkpoints instead.
The search scores on a GPU where there is one. The writer streams: one shard of the tuned model in
memory at a time (plus the base's matching tensors), each tensor interpolated in fp32 and written in
the tuned model's dtype, into the tuned model's shard layout with its config and tokenizer files.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cpt_core.atomic import atomic_path, write_json
from cpt_core.errors import UserError, run_cli
from cpt_core.logs import setup_logging
from data_prep.prep_dir import PrepDir

from .cli_args import merge_parser

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"


def weight_files(model: Path) -> dict[str, str]:
    """Tensor name → the safetensors file (in ``model``) that holds it."""
    if (model / INDEX).is_file():
        return json.loads((model / INDEX).read_text())["weight_map"]
    single = model / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{model}: no model.safetensors or {INDEX} (a Hugging Face safetensors directory is needed)")
    with safe_open(str(single), "pt") as f:
        return {k: single.name for k in f.keys()}


def streamed_shards(models: list[Path]) -> Iterator[tuple[str, dict[str, list[torch.Tensor]]]]:
    """For each shard file of ``models[0]``: its name and, per tensor, that tensor from every model.

    Only one shard's tensors are in memory at a time; the other models may be sharded differently.
    """
    maps = [weight_files(m) for m in models]
    names = set(maps[0])
    for model, mapping in zip(models[1:], maps[1:]):
        # a tied output embedding is the input one: exports leave it out, some base checkpoints store it anyway
        extra_heads = {k for k in set(mapping) - names if k.endswith("lm_head.weight")}
        if set(mapping) - extra_heads != names:
            extra, missing = sorted(set(mapping) - names)[:3], sorted(names - set(mapping))[:3]
            raise UserError(f"{model} and {models[0]} hold different tensors ({missing} / {extra}): not one model")
    for shard in sorted(set(maps[0].values())):
        keys = sorted(k for k, f in maps[0].items() if f == shard)
        with ExitStack() as stack:
            handles: dict[tuple[int, str], Any] = {}

            def tensor(i: int, key: str) -> torch.Tensor:
                file = maps[i][key]
                if (i, file) not in handles:
                    handles[(i, file)] = stack.enter_context(safe_open(str(models[i] / file), "pt"))
                return handles[(i, file)].get_tensor(key)

            yield shard, {k: [tensor(i, k) for i in range(len(models))] for k in keys}


def write_combined(
    models: list[Path], out: Path, combine: Callable[[list[torch.Tensor]], torch.Tensor], meta: dict[str, Any]
) -> None:
    """``out`` (atomically): every tensor ``combine``d over ``models`` in fp32, in ``models[0]``'s dtype and
    shard layout, with ``models[0]``'s config and tokenizer files."""
    first = models[0]
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for shard, tensors in streamed_shards(models):
            merged = {k: combine([t.to(torch.float32) for t in ts]).to(ts[0].dtype) for k, ts in tensors.items()}
            save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp / shard), metadata={"format": "pt"})
            del tensors, merged
        for f in first.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("eval.json", "report.md"):
                shutil.copy2(f, tmp / f.name)
        write_json(tmp / "merge.json", meta)


def interpolate(base: Path, tuned: Path, alpha: float, out: Path, meta: dict[str, Any] | None = None) -> Path:
    """θ_base + α (θ_tuned − θ_base), as ``torch.lerp``: exactly the base at α 0 and the tuned model at α 1."""
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--alpha must be in [0, 1], got {alpha}")
    info = {"base": str(base), "tuned": str(tuned), "alpha": alpha, **(meta or {})}
    write_combined([tuned, base], out, lambda ts: torch.lerp(ts[1], ts[0], alpha), info)
    log.info("merged %s toward %s at alpha %.4g → %s", tuned, base, alpha, out)
    return out


def average(models: list[Path], out: Path) -> Path:
    """The mean of ``models``' weights (the same architecture), streamed as :func:`interpolate`."""
    meta = {"average_of": [str(m) for m in models]}
    write_combined(models, out, lambda ts: torch.stack(ts).mean(0), meta)
    log.info("averaged %d models → %s", len(models), out)
    return out


def largest_within(
    rise: Callable[[float], float], budget: float, tolerance: float = 1 / 32, smallest: float = 1 / 1024
) -> tuple[float, list]:
    """The largest α in [0, 1] with ``rise(α) <= budget`` by bisection (the rise grows with α: the tuned model's
    forgetting is scaled in), to ``tolerance`` of the α it brackets, so a small α (a run at a high lr that
    forgot fast) is found as finely as a large one; below ``smallest`` it stops at 0. (α, [(α tried, rise)])."""
    tried = [(1.0, rise(1.0))]
    if tried[0][1] <= budget:
        return 1.0, tried
    low, high = 0.0, 1.0  # rise(0) is 0: the base itself
    while high - low > tolerance * high and high > smallest:
        mid = (low + high) / 2
        tried.append((mid, rise(mid)))
        low, high = (mid, high) if tried[-1][1] <= budget else (low, mid)
    return low, tried


def merge_to_budget(
    base: Path, tuned: Path, prep: Path, budget: float, out: Path, max_docs: int = 64, whole_documents: bool = True
) -> dict[str, Any]:
    """Score merges on the prep's probe documents, pick the largest α within ``budget``, write it."""
    # the models it scored are freed on return
    summary = search_alpha(base, tuned, prep, budget, max_docs, whole_documents=whole_documents)
    interpolate(base, tuned, summary["alpha"], out, {"to_budget": summary})
    return summary


def search_alpha(
    base: Path,
    tuned: Path,
    prep: Path,
    budget: float,
    max_docs: int = 64,
    device: torch.device | None = None,
    whole_documents: bool = True,
) -> dict[str, Any]:
    """The largest α within ``budget`` on the probe documents, with the probe rise and domain gain at each α
    tried. One model scores every merge, its weights set from the tuned and the base weights in turn, which
    stay in host memory in the export's dtype. On a GPU (the default where there is one) the model scored is
    one copy in that dtype there and each α is computed in fp32 a tensor at a time on the GPU; on the CPU it
    scores in fp32 (bf16 matmuls are slow there). ``whole_documents=False`` scores each document's first window
    only, as the forgetting bench's ``--first-window`` does. The merge it writes afterwards streams."""
    from transformers import AutoModelForCausalLM

    from .eval import load_hf
    from .evaluation.perplexity import document_losses, holdout_losses, logits_of, perplexity_change
    from .runtime.distributed import local_device

    index = PrepDir(prep).read()
    if index.probe is None:
        raise UserError(
            f"{prep}: no probe documents; --to-budget needs general documents no split shares: set "
            "data.replay.probe_docs (e.g. 64) and rerun the prep"
        )
    import datasets

    probe = datasets.load_from_disk(str(index.probe))
    probe = probe.select(range(min(max_docs, len(probe))))
    holdout_ids = {i for p in index.holdout.values() for i in datasets.load_from_disk(str(p))["id"]}
    overlap = holdout_ids & set(probe["id"])
    if overlap:
        raise UserError(f"{prep}: {len(overlap)} probe document(s) are also holdout documents; rebuild the prep")
    domain = {"domain": datasets.load_from_disk(str(index.holdout["domain"]))} if "domain" in index.holdout else {}
    device = device or local_device()
    model = load_hf(tuned)  # the export's dtype; from_pretrained maps the files and reads what is touched
    stored = next(model.parameters()).dtype
    tuned_state = {k: v.detach().clone() for k, v in model.named_parameters()}
    base_model = AutoModelForCausalLM.from_pretrained(str(base), local_files_only=True, dtype=stored)
    base_state = {k: v.detach() for k, v in base_model.named_parameters()}
    missing = sorted(set(tuned_state) - set(base_state))
    if missing:
        raise UserError(f"{base} and {tuned} are not one architecture (base lacks {missing[:3]})")
    model.to(device=device, dtype=torch.float32 if device.type == "cpu" else stored)
    params = dict(model.named_parameters())
    ids, masks, seq_len = probe["input_ids"], probe["loss_mask"], index.seq_len  # read once, scored at every α

    def at(alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            for k, p in params.items():  # fp32 lerp on the scoring device, one tensor's copies at a time
                ends = [state[k].to(device=device, dtype=torch.float32) for state in (base_state, tuned_state)]
                p.copy_(torch.lerp(*ends, alpha))
            forward = logits_of(model)
            scored = document_losses(forward, ids, masks, seq_len, device, whole_documents)
            held = holdout_losses(forward, domain, seq_len, max_docs, device, whole_documents) if domain else {}
            return scored, held

    base_probe, base_domain = at(0.0)
    report: list[dict[str, float]] = []

    def rise(alpha: float) -> float:
        scored, dom = at(alpha)
        change = perplexity_change(base_probe, scored)[0]
        gain = -perplexity_change(base_domain["domain"], dom["domain"])[0] if dom else math.nan
        report.append({"alpha": alpha, "probe_rise": change, "domain_gain": gain})
        log.info("alpha %.4f: probe general ppl %+.2f%%, domain ppl %+.2f%%", alpha, 100 * change, -100 * gain)
        return change

    alpha, _ = largest_within(rise, budget)
    chosen = next((r for r in report if r["alpha"] == alpha), {"alpha": 0.0, "probe_rise": 0.0, "domain_gain": 0.0})
    scored = {"probe_docs": len(probe), "first_window": not whole_documents}
    return {"budget": budget, "alpha": alpha, "chosen": chosen, "tried": report, **scored}


def average_last(run_dir: Path, k: int, out: Path) -> Path:
    """The mean of a run's last ``k`` complete checkpoints, each exported first (into a temporary directory)."""
    from .checkpoint.files import CheckpointDir, checkpoint_root
    from .export import export

    tags = [c for c in CheckpointDir.saved(checkpoint_root(run_dir)) if c.is_pipeline_checkpoint()][-k:]
    if k < 1 or len(tags) < k:
        raise UserError(f"{run_dir}: {len(tags)} complete checkpoint(s), fewer than --average-last {k}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".average-", dir=out.parent) as tmp:
        exported = [Path(tmp) / t.tag for t in tags]
        for tag, path in zip(tags, exported):
            export(tag.path, path)
        return average(exported, out)


def main(argv: list[str] | None = None) -> int:
    args = merge_parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        out = Path(args.out)
        needed = {"average_last": ["run"], "to_budget": ["base", "tuned", "prep"], "alpha": ["base", "tuned"]}
        mode = next(m for m in needed if getattr(args, m) is not None)
        missing = [f"--{n}" for n in needed[mode] if getattr(args, n) is None]
        if missing:
            raise UserError(f"--{mode.replace('_', '-')} needs {' and '.join(missing)}")
        if args.first_window and mode != "to_budget":
            flag = "--" + mode.replace("_", "-")
            raise UserError(f"--first-window sets how --to-budget scores; it does nothing with {flag}")
        if args.average_last:
            average_last(Path(args.run), args.average_last, out)
        elif args.to_budget is not None:
            paths = Path(args.base), Path(args.tuned), Path(args.prep)
            summary = merge_to_budget(*paths, args.to_budget, out, whole_documents=not args.first_window)
            print(json.dumps({"alpha": summary["alpha"], **summary["chosen"]}, sort_keys=True))
        else:
            interpolate(Path(args.base), Path(args.tuned), args.alpha, out)

    return run_cli(body, log)


if __name__ == "__main__":
    sys.exit(main())
