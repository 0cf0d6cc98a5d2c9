"""Forgetting and learning: ``python -m pipeline.eval --model TUNED_HF_DIR --base BASE_HF_DIR --prep PREP``.

Perplexity on the general and domain holdouts (each document alone, whole
documents in seq_len windows; see pipeline/evaluation/perplexity.py), for the
tuned model and, with ``--base``, the base model: general ppl change is
forgetting, domain ppl change is learning. With ``--cache`` (a GeRe cache of
the base model) also the TM loss of the tuned model on the replay set and the
share of final-layer activation states (neg/neutral/pos) that moved: how far
the model drifted where GeRe holds it. Forgetting is reported only when no
scored document is a replay sample or in the training rows (a prep from
``data_prep prepare`` guarantees it; older preps did not). Runs as one process (the whole model
on this process's device) or as N ranks under the launcher: then the model is
partitioned with ZeRO-3 as it loads (no rank ever holds it whole: a 70B model
evaluates on nodes that could not hold it on one GPU), documents are split
across ranks, and every rank runs the same number of forwards
(``pipeline/evaluation/perplexity.py``), since each forward gathers layers collectively.
A training checkpoint is exported once, by rank 0, next to the checkpoint.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from cpt_core.atomic import write_json, write_text
from cpt_core.errors import UserError, one_line, run_cli
from cpt_core.logs import process_rank, setup_logging
from data_prep.holdout import contamination
from data_prep.prep_dir import PrepDir
from data_prep.replay import ReplayShard
from data_prep.tokenizer import load_tokenizer

from .checkpoint.files import CheckpointDir
from .cli_args import eval_parser
from .evaluation.mcq import mcq_accuracy, read_questions
from .evaluation.perplexity import holdout_losses, logits_of, perplexities, perplexity_change
from .evaluation.report import markdown_table
from .export import export
from .gere.cache import GeReCache, pad_replay_rows
from .gere.states import activation_states, unpack_states
from .losses.tm_loss import tm_loss_reference
from .runtime.distributed import finish, init_distributed, local_device
from .runtime.model import ModelSource, final_hidden_states, load_causal_lm, model_fingerprint

log = logging.getLogger("pipeline.eval")


def load_hf(path: str | Path) -> torch.nn.Module:
    """A Hugging Face model directory, or a training checkpoint (exported to a temporary directory first)."""
    path = Path(path)
    if CheckpointDir(path).is_pipeline_checkpoint():
        with tempfile.TemporaryDirectory() as tmp:
            exported = Path(tmp) / "hf"
            export(path, exported)
            return _from_pretrained(exported)
    return _from_pretrained(path)


def _from_pretrained(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        str(hf_directory(path)), local_files_only=True, use_safetensors=True, trust_remote_code=False
    ).eval()


def hf_directory(path: Path) -> Path:
    """``path``, refused unless it is a Hugging Face model directory."""
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model directory (export a checkpoint with pipeline.export)")
    return path


def hf_view(path: Path, timeout_minutes: float = 30.0) -> tuple[Path, Path | None]:
    """A Hugging Face directory for ``path``: itself, or, for a training checkpoint, its export, written once by
    rank 0 before any process group forms; the other ranks poll the shared file system for it, so no rank
    waits in a collective (and its timeout) through minutes of I/O at 70B. Returns (directory, the export to
    remove afterwards, or None).

    The other ranks take only an export (or rank 0's failure marker) written since this launch began, so one
    left by a killed earlier launch is never read, and give up after ``timeout_minutes``.
    """
    if not CheckpointDir(path).is_pipeline_checkpoint():
        return path, None
    # one name for every rank of this launch (they share MASTER_PORT)
    target = path.parent / f".eval-export-{path.name}-{os.environ.get('MASTER_PORT', 'local')}"
    failed = target.with_name(target.name + ".failed")
    if process_rank() == 0:
        failed.unlink(missing_ok=True)
        try:
            export(path, target)  # atomic: the directory appears complete or not at all
        except Exception as e:
            write_text(failed, one_line(e))
            raise
        return target, target
    since, deadline = launch_started() - 60.0, time.time() + 60.0 * timeout_minutes
    while not (target.is_dir() and target.stat().st_mtime >= since):
        if failed.is_file() and failed.stat().st_mtime >= since:
            raise UserError(f"{path}: export on rank 0 failed: {failed.read_text()}")
        if time.time() > deadline:
            raise UserError(f"{path}: rank 0 wrote no export in {timeout_minutes:g} minutes ({target})")
        time.sleep(1.0)
    return target, target


def launch_started() -> float:
    """When the launcher that started this rank began (its parent process; Linux), else now."""
    try:
        ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def remove_view(exported: Path | None) -> None:
    if exported is not None and process_rank() == 0:
        shutil.rmtree(exported, ignore_errors=True)
        exported.with_name(exported.name + ".failed").unlink(missing_ok=True)


def check_eval_inputs(model: str, base: str | None, prep: str, cache: str | None, mcq: list[str] | None) -> None:
    """Every path the eval reads, refused before the process group forms (on a cluster every rank would
    otherwise start, import and wait in NCCL before saying it)."""
    model_path = Path(model)
    if not CheckpointDir(model_path).is_pipeline_checkpoint():
        hf_directory(model_path)
    if base is not None:
        hf_directory(Path(base))
    PrepDir(prep).read()
    if cache is not None and not Path(cache).is_dir():
        raise UserError(f"--cache {cache}: no such GeRe cache directory (cpt gere writes one)")
    for f in mcq or []:
        if not Path(f).is_file():
            raise UserError(f"--mcq {f}: no such file")


def eval_ds_config(dtype: str) -> dict[str, Any]:
    """ZeRO-3 for inference: parameters partitioned over the ranks, gathered a layer at a time; no optimizer."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": False},
    }


def load_partitioned(path: str | Path, device: torch.device) -> Any:
    """A Hugging Face directory as a ZeRO-3 inference engine over all ranks (collective: every rank calls it).

    bf16 on CUDA (what training runs; an fp32 copy would double every gather), fp32 on CPU.
    """
    path = Path(path)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    source = hf_directory(path)  # a training checkpoint is exported first, before the group forms (hf_view)
    ds_config = eval_ds_config(dtype)
    model = load_causal_lm(ModelSource(path=str(source), dtype=dtype), ds_config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    log.info("%s: partitioned over %d ranks (ZeRO-3, %s)", path, dist.get_world_size(), dtype)
    return engine


def holdout_document_losses(
    model: torch.nn.Module,
    prep: str | Path,
    max_docs: int,
    whole_documents: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """{role: each holdout document's (NLL, tokens)} of ``model`` (already on ``device``), each document alone."""
    paths = PrepDir(prep).read()
    holdout = {r: datasets.load_from_disk(str(p)) for r, p in paths.holdout.items() if r in ("general", "domain")}
    with torch.no_grad():
        return holdout_losses(logits_of(model), holdout, paths.seq_len, max_docs, device, whole_documents)


def multiple_choice(
    model: torch.nn.Module, prep: str | Path, files: list[str], device: torch.device | str = "cpu"
) -> dict[str, float]:
    """{'mcq/<file stem>/acc': ..., '.../acc_norm': ...} for each question file (``pipeline/evaluation/mcq.py``)."""
    tokenizer = load_tokenizer(PrepDir(prep).read().tokenizer)
    out = {}
    for path in files:
        scores = mcq_accuracy(logits_of(model), tokenizer, read_questions(path), device)
        out.update({f"mcq/{Path(path).stem}/{k}": v for k, v in scores.items() if k != "n"})
    return out


def replay_drift(
    model: torch.nn.Module,
    prep: str | Path,
    cache_dir: str | Path,
    base_dir: str | Path,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """TM loss (reference) on the replay set and the share of activation states that changed since the base."""
    paths = PrepDir(prep).read()
    shard = ReplayShard.open(paths.replay)
    rows = shard.rows()
    # checked against the base model and the prep's tokenizer: a cache of another model would measure nothing
    cache = GeReCache.open(
        cache_dir,
        model_fingerprint(ModelSource(path=str(base_dir))),
        load_tokenizer(paths.tokenizer).fingerprint,
        device=device,
    )
    cache.check_shard(shard, rows)
    total = count = flipped = real = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            index = list(range(start, min(start + batch_size, len(rows))))
            ids, mask = pad_replay_rows(rows[index]["input_ids"], shard.replay_len)
            ids, mask = ids.to(device), mask.to(device)
            h = final_hidden_states(getattr(model, "module", model), ids, mask)
            packed = cache.states(index, device)
            tm, n = tm_loss_reference(h, packed, cache.thresholds.neg, cache.thresholds.pos, mask)
            total += float(tm) * int(n)
            count += int(n)
            now = activation_states(h, cache.thresholds.neg, cache.thresholds.pos)
            before = unpack_states(packed, h.shape[-1])
            keep = mask.bool()
            flipped += float((now != before)[keep].sum())
            real += float(keep.sum()) * h.shape[-1]
    return {"replay_tm": total / count if count else 0.0, "replay_state_flip_rate": flipped / real if real else 0.0}


def holdout_contamination(prep: str | Path, max_docs: int) -> dict[str, dict[str, int]]:
    """Per holdout split: how many of the documents scored are replay samples or in the training rows."""
    paths = PrepDir(prep).read()
    replay_ids = ReplayShard.open(paths.replay).rows()["id"] if paths.replay else []
    builds = [str(b) for b in paths.builds.values()]
    out = {}
    for role, path in paths.holdout.items():
        if role in ("general", "domain"):
            ds = datasets.load_from_disk(str(path))
            out[role] = contamination(ds.select(range(min(max_docs, len(ds))))["id"], replay_ids, builds)
    return out


def compare(
    tuned: dict[str, float],
    base: dict[str, float] | None,
    contaminated: dict[str, dict[str, int]] | None = None,
    documents: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Both models' figures, and the ppl changes when every scored document is clean (see
    :func:`holdout_contamination`): on documents the run trained on, a change measures memorisation.
    ``documents``: {model: {role: each document's (NLL, tokens)}}; with it each change gets its standard error
    over documents (``<role>_ppl_change_se``): a 100-document holdout of mixed genres can read points away from
    another of the same source."""
    out: dict[str, Any] = {"tuned": tuned}
    dirty = {role: c for role, c in (contaminated or {}).items() if c["in_replay"] or c["in_training"]}
    if contaminated is not None:
        out["holdout_contamination"] = contaminated
    if dirty:
        out["not_reported"] = "; ".join(
            f"{c['in_replay']} of the {c['scored']} {role} holdout documents are replay samples and "
            f"{c['in_training']} are in the training data"
            for role, c in dirty.items()
        )
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.warning(
                "forgetting not reported: %s; rebuild the prep with this version of `data_prep prepare`",
                out["not_reported"],
            )
    if base is not None:
        out["base"] = base
        for role in ("general", "domain"):
            if role in dirty:
                continue
            key = f"ppl/{role}"
            if key in tuned and key in base:
                out[f"{role}_ppl_change"] = tuned[key] / base[key] - 1.0
                if documents is not None:
                    error = perplexity_change(documents["base"][role], documents["tuned"][role])[1]
                    out[f"{role}_ppl_change_se"] = error
        for key in tuned:
            if key.startswith("mcq/") and key.endswith("/acc") and key in base:
                out[f"{key}_change"] = tuned[key] - base[key]  # accuracy points, not a ratio
    return out


def main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    setup_logging()

    def body() -> None:
        check_eval_inputs(args.model, args.base, args.prep, args.cache, args.mcq)  # in seconds, before any rank waits
        model, exported = hf_view(Path(args.model), args.timeout_minutes)
        try:
            init_distributed(args.timeout_minutes)  # this rank's device first, then the process group (NCCL)
            result = run_eval(str(model), args.prep, args.base, args.cache, args.max_docs, local_device(), args.mcq)
            finish()  # a barrier: every rank has read the export
        finally:
            remove_view(exported)
        if process_rank() == 0:
            print(markdown_table(result))
            if args.out:
                write_json(args.out, result)

    return run_cli(body, log)


def run_eval(
    model_dir: str,
    prep: str,
    base_dir: str | None = None,
    cache: str | None = None,
    max_docs: int = 200,
    device: torch.device | str = "cpu",
    mcq: list[str] | None = None,
) -> dict[str, Any]:
    """Tuned (and base) model on ``device``: perplexities, with ``cache`` the replay drift, with ``mcq`` the
    multiple-choice accuracy on each question file.

    Under several ranks the models are partitioned (:func:`load_partitioned`), one after the other.
    """
    if cache and not base_dir:
        raise UserError("--cache needs --base: the cache is checked against the base model it was built from")
    results, documents = {}, {}
    partitioned = dist.is_initialized() and dist.get_world_size() > 1
    for name, path in (("tuned", model_dir), ("base", base_dir)):
        if path is None:
            continue
        model = load_partitioned(path, torch.device(device)) if partitioned else load_hf(path).to(device)
        documents[name] = holdout_document_losses(model, prep, max_docs, device=device)
        r = perplexities(documents[name])
        if mcq:
            r.update(multiple_choice(model, prep, mcq, device))
        if cache and name == "tuned":
            r.update(replay_drift(model, prep, cache, base_dir, device=device))
        elif cache:  # the cache *is* the base model's view: TM 0 and no state moved, by construction
            r.update(replay_tm=0.0, replay_state_flip_rate=0.0)
        results[name] = r
        del model  # before the next one loads (a ZeRO-3 engine holds reference cycles through its hooks)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return compare(results["tuned"], results.get("base"), holdout_contamination(prep, max_docs), documents)


if __name__ == "__main__":
    sys.exit(main())
