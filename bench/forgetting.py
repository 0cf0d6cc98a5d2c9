"""Forgetting benchmark: what each anti-forgetting option costs in domain learning and saves in general ability.

Every row continues the same base model on the same domain corpus as a real
2-rank ZeRO-3 run, and is scored on general and domain holdout documents that
no run trains on or replays (the bench refuses a prep where one is; see
``pipeline.eval.holdout_contamination``). Every row runs once per seed; a seed
changes the mixture's row order and the replay sampling (a base is a given
checkpoint, so there is no init to vary).

    python -m pipeline.demo && python -m bench.forgetting --tiny              # the demo's base and corpora
    python -m bench.forgetting --model HF_DIR --general G... --domain D... --lr 2e-5

Per row: general and domain perplexity change against the base, mean ± std
over seeds, and the row's forgetting and learning as ratios of naive CPT's at
the same lr. A difference from naive smaller than twice its standard error
(the two rows' seed spreads) is marked "~": within noise. Results are kept in
``OUT/results.json`` as they finish, so an interrupted bench resumes; each
run's training log is kept as ``OUT/metrics/<row>-s<seed>.jsonl``.
Last line: default_forgetting_vs_naive=<x> default_learning_vs_naive=<y> seeds=<n> clean_holdout=<0|1> default='<row>'
(the default method, what cpt init writes), then GeRe TM's tm_forgetting_vs_naive and tm_learning_vs_naive.
(goal x <= 0.25 and y >= 0.95 at every lr).

This module prepares, runs and prints; the rows are data, ``bench/rows/default.yaml`` and ``--rows FILE``
(read by ``bench/forgetting_rows.py``), and the arithmetic on stored results (ratios, noise, a budget row
against its fixed weights) is in ``bench/forgetting_compare.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from datasets import load_from_disk

from bench.forgetting_compare import (
    beyond_noise,
    changes,
    end_rise,
    fixed_line,
    learning,
    mean_std,
    metrics_file,
    peak_line,
    probe_peak,
    ratio,
    with_naive,
)
from bench.forgetting_rows import DEFAULT_ROWS, Row, at_each_lr, load_rows, with_role
from bench.harness import finish, git_commit
from cpt_core.atomic import write_json
from cpt_core.logs import setup_logging
from data_prep.config import parse_config
from data_prep.mix import mix
from data_prep.prep_dir import PrepDir
from data_prep.prepare import prepare
from pipeline.checkpoint.files import CheckpointDir
from pipeline.eval import holdout_contamination, holdout_document_losses, load_hf
from pipeline.evaluation.perplexity import perplexities
from pipeline.gere.build import cache_is_current
from pipeline.launch import ROOT, run_deepspeed
from pipeline.runtime.model import ModelSource, model_fingerprint

log = logging.getLogger("bench.forgetting")

RANKS = 2  # every run is a real 2-rank ZeRO-3 run (run_deepspeed's default)


# --- setup -------------------------------------------------------------------------------------------


def global_rows(args: argparse.Namespace) -> int:
    """Rows per optimizer step: 2 ranks x micro batch x accumulation (the mixture's batch for its stats)."""
    return RANKS * args.micro_batch * args.grad_accum


def base_and_corpora(args: argparse.Namespace) -> tuple[Path, str, list[str], list[str]]:
    """(base model directory, tokenizer, general paths, domain paths) from the arguments."""
    if args.tiny:
        demo = Path(args.demo).resolve()
        base = demo / "base" / "hf"
        if not (base / "config.json").is_file():
            raise SystemExit(f"{demo}: run `python -m pipeline.demo` first (it pretrains the tiny base)")
        general = args.general or [str(demo / "corpora" / "general.jsonl.gz")]
        domain = args.domain or [str(demo / "corpora" / "domain.jsonl.gz")]
        return base, str(demo / "tokenizer" / "spm.model"), general, domain
    if not args.general or not args.domain:
        raise SystemExit("--model needs --general and --domain corpora")
    return Path(args.model).resolve(), str(Path(args.model).resolve()), args.general, args.domain


def prepare_data(out: Path, tokenizer: str, general: list[str], domain: list[str], args: argparse.Namespace) -> Path:
    """Builds, the replay shard and holdouts, once; the mixtures differ by seed (see :func:`seeded_prep`)."""
    prep = out / "prep"
    if not PrepDir(prep).is_complete():
        cfg = {
            "tokenizer": tokenizer,
            "out": str(prep),
            "seq_len": args.seq_len,
            "seed": 1234,
            "workers": 2,
            "sources": [
                {"name": "general", "role": "general", "paths": [str(Path(p).resolve()) for p in general]},
                {"name": "domain", "role": "domain", "paths": [str(Path(p).resolve()) for p in domain]},
            ],
            "mix": {"general_ratio": 0.15, "batch_rows": global_rows(args)},
            "replay": {"num_samples": args.replay_samples, "replay_len": args.seq_len, "probe_docs": args.probe_docs},
            "holdout": {"fraction": args.holdout_fraction, "max_docs": args.eval_docs},
        }
        prepare(parse_config(cfg, base=out, origin="bench.forgetting"), quiet=True)
    probe = PrepDir(prep).read().probe
    held = len(load_from_disk(str(probe))) if probe else 0
    if held != args.probe_docs:
        raise SystemExit(f"{prep} sets apart {held} probe documents, not --probe-docs {args.probe_docs}: another --out")
    found = holdout_contamination(prep, args.eval_docs)
    if any(c["in_replay"] or c["in_training"] for c in found.values()):
        raise SystemExit(f"{prep}: scored holdout documents are replayed or trained on: {found}")
    return prep


def seeded_prep(prep: Path, seed: int, mixed: bool, batch_rows: int) -> Path:
    """``prep`` with its mixture re-drawn in seed ``seed``'s row order (general share 15%, or 0)."""
    out = prep.parent / f"prep-{'mix' if mixed else 'nomix'}-s{seed}"
    seeded = PrepDir(out)
    if not seeded.is_complete():
        index = PrepDir(prep).read()
        builds = [str(b) for name, b in index.builds.items() if mixed or name == "domain"]
        manifest = mix(builds, seeded.mixture, 0.15 if mixed else 0.0, seed=seed, batch_rows=batch_rows, quiet=True)
        seeded.write(index.with_mixture(seeded.mixture, manifest["achieved_token_share"], manifest["rows"]))
    return out


def train_config(row: Row, seed: int, prep: Path, base: Path, cache: Path, out: Path, args) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "run_dir": str(out),
        "stage": "cpt",
        "steps": args.steps,
        "seed": seed,
        "deepspeed": str(ROOT / "ds_configs" / "zero3_cpu.json"),
        "model": {"path": str(base)},
        "data": {"prep": str(prep)},
        "optim": {"lr": args.lr * row.lr_mult, "warmup_steps": 5, "min_lr_ratio": 0.1},
        "batch": {"micro_batch": args.micro_batch, "grad_accum": args.grad_accum},
        "checkpoint": {"every": 0, "keep_last": 1, "resume": "never"},
        "eval": {"max_docs": 8},
        "log": {"tensorboard": False},
    }
    for key, value in row.extra.items():
        if key == "merge":  # applied to the trained model after its export (run_row)
            continue
        cfg[key] = {**cfg[key], **value} if isinstance(cfg.get(key), dict) else value
        if key == "replay":
            cfg[key] = {"samples_per_step": args.replay_per_step, **value}
            if row.reads_cache:
                cfg[key]["cache"] = str(cache)
        if key == "forgetting":
            cfg[key] = {**value, "probe_docs": args.probe_docs}
    return cfg


def gere_cache(out: Path, prep: Path, base: Path, row: Row, args: argparse.Namespace) -> Path:
    """The base model's GeRe cache, built as ``row`` (a row that reads it) replays (2 ranks, its replay rows per
    forward), and built again when it is not the current base's (a re-pretrained demo base at the same path) or
    not that layout."""
    cache = out / "gere_cache"
    config = out / "gere.yaml"
    config.write_text(yaml.safe_dump(train_config(row, 0, prep, base, cache, out / "unused", args)))
    if not cache_is_current(config, RANKS):
        if run_deepspeed("pipeline.gere", ["--config", str(config)]).returncode != 0:
            raise SystemExit("building the GeRe cache failed")
    return cache


# --- runs --------------------------------------------------------------------------------------------


def score(model: Any, prep: Path, args: argparse.Namespace) -> dict[str, float]:
    """Holdout perplexities: whole documents, or with --first-window each document's first seq_len tokens."""
    return perplexities(holdout_document_losses(model, prep, args.eval_docs, whole_documents=not args.first_window))


def run_row(row: Row, seed: int, prep: Path, base: Path, cache: Path, work: Path, args) -> dict[str, float]:
    """Train, export and score one (row, seed); returns its holdout perplexities and wall seconds."""
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(train_config(row, seed, prep, base, cache, out, args)))
    start = time.perf_counter()
    result = run_deepspeed("pipeline.train", ["--config", str(out / "config.yaml")], capture=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{row.name}, seed {seed}: training failed\n{result.stderr[-3000:]}")
    latest = CheckpointDir.latest_of_run(out)
    subprocess.run(
        [sys.executable, "-m", "pipeline.export", "--checkpoint", str(latest.path), "--out", str(out / "hf")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    scored, merged = out / "hf", {}
    if "merge" in row.extra:
        scored, merged = merge(row.extra["merge"], base, out, prep, args.first_window)
    scores = {**score(load_hf(scored), prep, args), **merged}
    kept = metrics_file(work, row.name, seed)  # the training log outlives its checkpoints: the controller, the probe
    kept.parent.mkdir(exist_ok=True)
    shutil.copyfile(out / "metrics.jsonl", kept)
    shutil.rmtree(out)
    return {**scores, "seconds": seconds, "commit": git_commit()}


def merge(
    how: dict[str, Any], base: Path, run: Path, prep: Path, first_window: bool = False
) -> tuple[Path, dict[str, float]]:
    """The run's export merged toward the base (``to_budget``: on the prep's probe documents, their first windows
    with ``first_window`` as the holdout is scored) or its last checkpoints averaged (``average_last``), with
    pipeline.merge as a user runs it; (model, what it chose)."""
    out = run / "merged"
    if "average_last" in how:
        args = ["--run", str(run), "--average-last", str(how["average_last"])]
    else:
        args = [
            "--base",
            str(base),
            "--tuned",
            str(run / "hf"),
            "--to-budget",
            str(how["to_budget"]),
            "--prep",
            str(prep),
            *(["--first-window"] if first_window else []),
        ]
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.merge", *args, "--out", str(out)], cwd=ROOT, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"{run}: pipeline.merge failed\n{done.stderr[-3000:]}")
    chosen = json.loads(done.stdout.strip().splitlines()[-1]) if "to_budget" in how else {}
    return out, {k: chosen[k] for k in ("alpha", "probe_rise") if k in chosen}


# --- the table ---------------------------------------------------------------------------------------


def print_table(results: dict[str, Any], rows: list[Row], args: argparse.Namespace, work: Path) -> None:
    print(
        f"\n{args.steps} steps of {global_rows(args)} x {args.seq_len} tokens from {results['base_name']}, "
        f"lr {args.lr:g} (1x), {RANKS} CPU ranks, seeds {' '.join(map(str, args.seeds))}; {results['scored']}"
    )
    print("| run | seeds | Δ general ppl | Δ domain ppl | forgetting / naive | learning / naive | wall s |")
    print("|---|---|---|---|---|---|---|")
    b = results["base"]
    print(f"| base (ppl {b['ppl/general']:.2f} general, {b['ppl/domain']:.2f} domain) | | | | | | |")
    for row in rows:
        if row.name not in results["rows"]:
            continue
        (g, ng), (d, nd) = with_naive(results, row.name, "general"), with_naive(results, row.name, "domain")
        cells = [f"{m:+.1%} ± {s:.1%}" for m, s in (mean_std(g), mean_std(d))]
        if row.is_naive:
            cells += ["1", "1"]
        else:
            cells += [
                f"{ratio(g, ng, +1):.2f}{'' if beyond_noise(g, ng) else ' ~'}",
                f"{ratio(d, nd, -1):.2f}{'' if beyond_noise(d, nd) else ' ~'}",
            ]
        seconds = statistics.fmean(r["seconds"] for r in results["rows"][row.name].values())
        print(f"| {row.name} | {len(g)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    print(
        "Δ: mean ± std over seeds; ratios: mean over seeds of the row's Δ over naive's (nan where a naive seed did "
        "not forget, or did not learn); ~: within noise"
    )
    default = with_role(rows, "default")
    for row in at_each_lr(rows, default) if default else []:
        (g, ng), (d, nd) = with_naive(results, row.name, "general"), with_naive(results, row.name, "domain")
        if g and ng:
            print(
                f"{row.lr_mult:g}x lr: {row.name} forgets {ratio(g, ng, +1):.2f} of naive's rise (goal <= 0.25) "
                f"and learns {ratio(d, nd, -1):.2f} of its gain (goal >= 0.95)"
            )
    for row in (r for r in rows if r.holds_budget):
        g = changes(results, row.name, "general")
        if g:
            held = sum(x <= row.extra["forgetting"]["budget"] for x in g)
            print(f"{row.name}: general ppl rise {mean_std(g)[0]:+.1%}, within the budget in {held} of {len(g)} seeds")
    for row in rows:  # what a merge to a budget chose on the probe, beside what the holdout then says
        runs = results["rows"].get(row.name, {}) if "to_budget" in row.extra.get("merge", {}) else {}
        if runs:
            alphas = ", ".join(f"{r['alpha']:.3f}" for _, r in sorted(runs.items()))
            probe = mean_std([r["probe_rise"] for r in runs.values()])
            print(f"{row.name}: alpha {alphas} (seeds in order); probe rise {probe[0]:+.1%} ± {probe[1]:.1%}")
    for row in rows:
        compared = fixed_line(results, row, rows) if row.holds_budget and row.name in results["rows"] else None
        if compared:
            print(compared)
    print_peaks(results, rows, work)


def print_peaks(results: dict[str, Any], rows: list[Row], work: Path) -> None:
    """Each probed run's probe peak beside its end, and each budget row against the watched weights there."""
    probed = [r for r in rows if "forgetting" in r.extra and r.name in results["rows"]]
    peaks = {(r.name, s): probe_peak(work, r.name, int(s)) for r in probed for s in results["rows"][r.name]}
    if any(math.isfinite(v) for v in peaks.values()):
        print("\n| run | seed | probe peak | Δ general ppl (holdout, end) | learning / naive |")
        print("|---|---|---|---|---|")
        for (name, seed), peak in peaks.items():
            end, learned = end_rise(results, name, seed), learning(results, name, seed)
            print(f"| {name} | {seed} | {peak:+.1%} | {end:+.1%} | {learned:.3f} |")
        for row in probed:
            compared = peak_line(results, row, rows, work) if row.holds_budget else None
            if compared:
                print(compared)


def summary(results: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    """The default method (what cpt init and the demo run) against naive CPT, and GeRe's TM beside it."""
    clean = int(all(c["in_replay"] == c["in_training"] == 0 for c in results["contamination"].values()))
    figures: dict[str, Any] = {}
    for key, role in (("default", "default"), ("tm", "gere")):
        row = with_role(rows, role)
        name = row.name if row else ""
        (g, ng), (d, nd) = with_naive(results, name, "general"), with_naive(results, name, "domain")
        figures[f"{key}_forgetting_vs_naive"] = ratio(g, ng, +1)
        figures[f"{key}_learning_vs_naive"] = ratio(d, nd, -1)
        if key == "default":
            figures.update(seeds=min(len(g), len(ng)), clean_holdout=clean, default=repr(name))
    return figures


def wanted(name: str, args: argparse.Namespace) -> bool:
    """Whether --only selects the row: a name that contains one of its strings, or with --exact is one."""
    if not args.only:
        return True
    return name in args.only if args.exact else any(o in name for o in args.only)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", action="store_true", help="the demo's tiny base and corpora (runs/demo)")
    which.add_argument("--model", help="a pretrained Hugging Face model directory (its tokenizer too)")
    p.add_argument("--general", nargs="+", help="general corpus files (jsonl, txt, parquet, ...)")
    p.add_argument("--domain", nargs="+", help="domain corpus files")
    p.add_argument("--demo", default=str(ROOT / "runs" / "demo"), help="with --tiny: the demo's directory")
    p.add_argument("--out", default=None, help="work directory (default runs/forgetting-tiny or -model)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3, help="the 1x learning rate (2e-5 for a real model)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=2, help="rows per rank per forward")
    p.add_argument("--grad-accum", type=int, default=2, help="forwards per optimizer step")
    p.add_argument("--replay-samples", type=int, default=500, help="documents in the replay shard")
    p.add_argument("--replay-per-step", type=int, default=4, help="replay samples per step, in the rows that replay")
    p.add_argument(
        "--probe-docs",
        type=int,
        default=32,
        help="general documents set apart for the forgetting budget's probe; the budget rows score all of them",
    )
    p.add_argument("--holdout-fraction", type=float, default=0.05)
    p.add_argument("--eval-docs", type=int, default=100, help="holdout documents scored per split")
    p.add_argument(
        "--first-window",
        action="store_true",
        help="score each holdout document's first seq_len tokens only (whole documents take hours for a real "
        "model on CPU: a State of the Union address is ~8k tokens)",
    )
    p.add_argument(
        "--rows",
        nargs="*",
        default=[],
        metavar="FILE",
        help=f"more rows (YAML, as {DEFAULT_ROWS.relative_to(ROOT)}), beside that file's; bench/rows/archive.yaml "
        "holds the rows measured earlier",
    )
    p.add_argument("--only", nargs="*", help="run only rows whose name contains one of these")
    p.add_argument("--exact", action="store_true", help="--only names whole rows: a row runs if its name is one")
    p.add_argument("--skip", nargs="*", default=[], help="skip rows whose name contains one of these")
    args = p.parse_args()
    setup_logging(brief=True)
    rows = load_rows(DEFAULT_ROWS, *args.rows)
    base, tokenizer, general, domain = base_and_corpora(args)
    work = Path(args.out or ROOT / "runs" / f"forgetting-{'tiny' if args.tiny else 'model'}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    prep = prepare_data(work, tokenizer, general, domain, args)
    # Building the cache is minutes on a real model (4.5 on SmolLM2 here): only for rows that read it.
    reading = [r for r in rows if r.reads_cache and wanted(r.name, args)]
    cache = gere_cache(work, prep, base, reading[0], args) if reading else work / "gere_cache"
    store = work / "results.json"
    # The base's weights, not only its path: a re-pretrained demo base (same path) scores differently, and
    # rows run on it are not comparable with naive CPT run on the old one.
    protocol = {
        "base": str(base),
        "base_weights": model_fingerprint(ModelSource(path=str(base))),
        "steps": args.steps,
        "lr": args.lr,
        "seq_len": args.seq_len,
        "docs": args.eval_docs,
    }
    if args.first_window:
        protocol["first_window"] = True
    if (global_rows(args), args.replay_per_step) != (8, 4):  # older results.json files lack the keys
        protocol["rows_per_step"] = global_rows(args)
        protocol["replay_per_step"] = args.replay_per_step
    if args.probe_docs != 32:  # the probe is set apart with the replay shard: another count, another shard
        protocol["probe_docs"] = args.probe_docs
    results = json.loads(store.read_text()) if store.is_file() else {}
    if results.get("protocol") != protocol:  # results of another protocol are not comparable: start over
        results = {"protocol": protocol, "rows": {}}
    results["base_name"] = "the demo's tiny base" if args.tiny else str(base)
    results["contamination"] = holdout_contamination(prep, args.eval_docs)
    results["scored"] = ", ".join(
        f"{c['scored']} {role} holdout docs ({c['in_replay']} replayed, {c['in_training']} trained on)"
        for role, c in results["contamination"].items()
    )
    if "base" not in results:
        results["base"] = score(load_hf(base), prep, args)
    definitions = results.setdefault("definitions", {})
    for row in rows:  # a row redefined since its results were stored (a weight, a budget) starts over
        if definitions.get(row.name) != row.definition and row.name in results["rows"]:
            # results stored without a definition are of unknown provenance: dropped too
            log.info("%s: stored results defined otherwise (or not recorded); they are dropped", row.name)
            del results["rows"][row.name]
        definitions[row.name] = row.definition
    for seed in args.seeds:
        for row in rows:
            if not wanted(row.name, args) or any(o in row.name for o in args.skip):
                continue
            if str(seed) in results["rows"].get(row.name, {}):
                continue
            scores = run_row(row, seed, seeded_prep(prep, seed, row.mixed, global_rows(args)), base, cache, work, args)
            results["rows"].setdefault(row.name, {})[str(seed)] = scores
            write_json(store, results)
            shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in scores.items()}
            log.info("%s, seed %d: %s", row.name, seed, shown)
    write_json(store, results)
    print_table(results, rows, args, work)
    finish("forgetting", summary(results, rows), {"results": str(store)})


if __name__ == "__main__":
    main()
