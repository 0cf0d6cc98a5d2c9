"""``cpt run RUN.yaml``: every stage of a run in order, each skipped when its output is current.

Stages: prep → GeRe cache (when a cached replay strategy needs one) → train
(under the deepspeed launcher) → export → eval and the report card. A stage's
record (``run_dir/stages/NAME.json``) holds the fingerprint of what it was made
from: its own settings, its inputs' sizes and times, and the fingerprint of the
stage before. A rerun after a kill or an edit redoes only the stages whose
fingerprint changed (a killed training run resumes from its last checkpoint);
training from other settings moves the old run aside instead of resuming it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cpt_core.atomic import write_json, write_text
from cpt_core.errors import UserError, run_cli
from cpt_core.logs import setup_logging

from .config import to_dict
from .launch import gpu_count, warn_stale_build_locks
from .runfile import RunFile, load_run
from .runtime.ds_json import read_ds_json

log = logging.getLogger(__name__)

STAGES = ("prep", "gere", "train", "export", "merge", "eval")


class StageFailed(UserError):
    """A stage's command exited non-zero; its own output above says why."""


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_fingerprint(paths: list[str]) -> list[tuple[str, int, int]]:
    """Name, size and modification time of every file under ``paths``: a changed corpus, tokenizer or model
    redoes the stages made from it."""
    found = []
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        found += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return found


@dataclass
class Stage:
    name: str
    fingerprint: str
    action: Callable[[], None]
    wanted: bool = True  # false: not part of this run (no cached strategy, no GeRe cache)


class Runner:
    """Runs a :class:`RunFile`'s stages: from ``start`` on (the ones before it taken as done elsewhere, e.g.
    training on a cluster), each redone when forced or not current; or ``only`` that one, forced."""

    def __init__(self, run: RunFile, start: str | None = None, only: str | None = None) -> None:
        self.run, self.only = run, only
        first = STAGES.index(only or start or STAGES[0])
        self.skipped = set(STAGES[:first])
        self.force = {only} if only else set(STAGES[first:]) if start else set()
        self.records = run.run_dir / "stages"

    def stages(self) -> list[Stage]:
        from data_prep.readers import resolve_inputs

        run, train = self.run, self.run.train
        tokenizer = run.prep_raw["tokenizer"]
        sources = resolve_inputs([p for s in run.prep_raw["sources"] for p in s["paths"]])
        prep = fingerprint(run.prep_raw, files_fingerprint([*sources, tokenizer]))
        model = fingerprint(train.model, files_fingerprint([train.model.path]) if train.model.path else None)
        # what training is made from: not how often it logs, saves or evaluates, nor its collective timeout
        settings = {k: v for k, v in to_dict(train).items() if k not in ("log", "checkpoint", "eval", "distributed")}
        replay = train.replay  # the cache depends on the base, the shard and how the run lays out its replay rows
        layout = (replay.strategy, replay.cache, replay.forward, replay.samples_per_step, train.batch.grad_accum)
        gere = fingerprint(prep, model, layout, train.deepspeed, train.model.attn_implementation, run.gpus)
        trained = fingerprint(prep, model, gere if run.uses_cache else None, settings, run.gpus)
        exported = fingerprint(trained, run.export)
        merged = fingerprint(exported, run.merge)
        evaluated = fingerprint(merged, train.eval.max_docs, train.eval.mcq)
        return [
            Stage("prep", prep, self.prep),
            Stage("gere", gere, self.gere, wanted=run.uses_cache),
            Stage("train", trained, self.train),
            Stage("export", exported, self.export),
            Stage("merge", merged, self.merge, wanted=run.merge.enabled),
            Stage("eval", evaluated, self.evaluate),
        ]

    def execute(self) -> Path:
        started = time.perf_counter()
        # the per-stage commands' config (RUN_DIR/train.yaml), also for training launched by other means
        write_text(self.train_config, yaml.safe_dump(to_dict(self.run.train), sort_keys=False))
        everything = [s for s in self.stages() if s.wanted]
        if self.only is None:  # --from: the stages before it were done elsewhere; a later plain run keeps them
            for stage in (s for s in everything if s.name in self.skipped):
                write_json(self.records / f"{stage.name}.json", {"fingerprint": stage.fingerprint, "complete": True})
        stages = [s for s in everything if s.name not in self.skipped]
        stages = [s for s in stages if self.only is None or s.name == self.only]
        redo = False
        for i, stage in enumerate(stages, 1):
            record = self.record(stage.name)
            current = record.get("fingerprint") == stage.fingerprint and record.get("complete")
            redo = redo or stage.name in self.force or not current
            if not redo:
                log.info("[%d/%d] %s: up to date, skipped", i, len(stages), stage.name)
                continue
            log.info("[%d/%d] %s", i, len(stages), stage.name)
            if stage.name == "train" and record and (stage.name in self.force or not current):
                self._set_aside(self.run.train_dir, record["fingerprint"])  # trained afresh, not resumed
            write_json(self.records / f"{stage.name}.json", {"fingerprint": stage.fingerprint, "complete": False})
            t0 = time.perf_counter()
            stage.action()
            write_json(
                self.records / f"{stage.name}.json",
                {"fingerprint": stage.fingerprint, "complete": True, "seconds": round(time.perf_counter() - t0, 1)},
            )
        report = (self.run.merged_dir if self.run.merge.enabled else self.run.export_dir) / "report.md"
        log.info("done in %.0f s: %s", time.perf_counter() - started, report if report.is_file() else self.run.run_dir)
        return report

    # ── the stages ────────────────────────────────────────────────────────────
    def prep(self) -> None:
        from data_prep.config import parse_config
        from data_prep.prepare import prepare

        write_text(self.run.run_dir / "prep.yaml", yaml.safe_dump(self.run.prep_raw, sort_keys=False))
        prepare(parse_config(self.run.prep_raw, base=self.run.run_dir, origin=str(self.run.path)))

    def gere(self) -> None:
        self._deepspeed("pipeline.gere", ["--config", str(self.train_config)])

    def train(self) -> None:
        self._deepspeed("pipeline.train", ["--config", str(self.train_config)])

    def export(self) -> None:
        args = ["--run", str(self.run.train_dir), "--out", str(self.run.export_dir)]
        args += ["--max-shard-size", self.run.export.max_shard_size] + (["--verify"] if self.run.export.verify else [])
        if self.run.train.adapter.kind != "none":  # the adapter alone too (PEFT's format): megabytes
            args += ["--adapter-out", "adapter"]
        self._call([sys.executable, "-m", "pipeline.export", *args])

    def merge(self) -> None:
        """The export interpolated toward the base: what eval then scores and the run delivers."""
        run, merge = self.run, self.run.merge
        args = ["--base", str(run.train.model.path), "--tuned", str(run.export_dir), "--out", str(run.merged_dir)]
        if merge.to_budget is not None:
            args += ["--to-budget", str(merge.to_budget), "--prep", str(run.prep_dir)]
        else:
            args += ["--alpha", str(merge.alpha)]
        self._call([sys.executable, "-m", "pipeline.merge", *args])

    def evaluate(self) -> None:
        from .evaluation.report import write_report

        run = self.run
        model = run.merged_dir if run.merge.enabled else run.export_dir
        out = model / "eval.json"
        args = ["--model", str(model), "--prep", str(run.prep_dir), "--max-docs", str(run.train.eval.max_docs)]
        if run.train.model.path:
            args += ["--base", run.train.model.path]
            if run.uses_cache:
                args += ["--cache", str(run.cache_dir)]
        if run.train.eval.mcq:
            args += ["--mcq", *run.train.eval.mcq]
        if gpu_count():  # partitioned over the ranks: a large model fits no single GPU
            self._deepspeed("pipeline.eval", [*args, "--out", str(out)])
        else:  # on CPU one process is faster than ZeRO-3 gathers between processes
            self._call([sys.executable, "-m", "pipeline.eval", *args, "--out", str(out)])
        result = json.loads(out.read_text())
        report = write_report(
            run.train_dir, result, title=f"Report: {run.path.name}", out_dir=model, about=self.about()
        )
        log.info("report card: %s", report)

    def about(self) -> dict[str, str]:
        """What the report card says of the run: the model, the method and the data it trained on."""
        from data_prep.prep_dir import PrepDir

        train, index = self.run.train, PrepDir(self.run.prep_dir).read()
        replay = train.replay
        method = "naive CPT" if replay.strategy == "none" else f"replay {replay.strategy} (weight {replay.weight})"
        if train.kd.weight:
            method += f", KD (weight {train.kd.weight}, rows {train.kd.rows})"
        if train.penalty.kind != "none":
            method += f", {train.penalty.kind} (weight {train.penalty.weight})"
        shares = ", ".join(f"{role} {share:.1%}" for role, share in sorted(index.achieved_token_share.items()))
        length = f"{train.steps} steps" if train.steps else f"{train.tokens} tokens"
        return {
            "model": train.model.path or "from scratch (model.config)",
            "method": method,
            "schedule": f"{length}, peak lr {train.peak_lr:g}, {train.optim.decay} decay, {self.run.gpus} rank(s)",
            "data": f"{index.rows} rows of {index.seq_len} tokens; token shares: {shares}",
            **({"merge": self._merge_summary()} if self.run.merge.enabled else {}),
            "run file": str(self.run.path),
        }

    def _merge_summary(self) -> str:
        meta = json.loads((self.run.merged_dir / "merge.json").read_text())
        text = f"alpha {meta['alpha']:.4g} toward the base"
        budget = meta.get("to_budget")
        if budget:
            text += f" (largest within a {budget['budget']:.1%} probe rise: {budget['chosen']['probe_rise']:+.2%})"
        return text

    # ── helpers ───────────────────────────────────────────────────────────────
    @property
    def train_config(self) -> Path:
        """The training config the per-stage commands read, written by :meth:`execute` before any stage."""
        return self.run.run_dir / "train.yaml"

    def _deepspeed(self, module: str, args: list[str]) -> None:
        from .launch import deepspeed_command, launch_env

        self._call(deepspeed_command(module, args, self.run.gpus, log_level="warning"), env=launch_env())

    def _call(self, command: list[str], env: dict[str, str] | None = None) -> None:
        from .launch import ROOT, launch_env

        done = subprocess.run(command, cwd=ROOT, env=env or launch_env())
        if done.returncode != 0:
            raise StageFailed(f"stage failed (exit {done.returncode}): {' '.join(command)}")

    def record(self, name: str) -> dict[str, Any]:
        path = self.records / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def _set_aside(self, directory: Path, old: str) -> None:
        if directory.exists():
            target = self.run.run_dir / "superseded" / f"{directory.name}-{old}"
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            directory.rename(target)
            log.info("train: settings changed since %s was trained; moved it to %s", directory, target)


def check_deepspeed_json(deepspeed_json: str) -> None:
    """A DeepSpeed optimizer section means an op DeepSpeed compiles on every node at its first start; a checkpoint
    writer that needs one is refused."""
    ds = read_ds_json(deepspeed_json)
    optimizer = ds.get("optimizer")
    if optimizer:
        zero = ds.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device") == "cpu"
        op = "CPU_ADAM" if offload else "FUSED_ADAM"
        log.warning(
            "%s names DeepSpeed's %s optimizer: DeepSpeed compiles its op on each node at first start (a compiler "
            "and a writable ~/.cache/torch_extensions needed); prebuild it once with DS_BUILD_%s=1 pip install "
            "deepspeed%s",
            deepspeed_json,
            optimizer.get("type"),
            op,
            "" if offload else ", or drop the section to use torch's fused AdamW (zero3_bf16 does)",
        )


def check_main(argv: list[str] | None = None) -> int:
    """``cpt check RUN.yaml``: ``cpt run --dry-run``."""
    return main(["--dry-run", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Run every stage of a run file: prep, GeRe cache, train, export, eval and report. "
        "A stage whose output is current is skipped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", help="the run file (YAML); `cpt init` writes one")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the run file")
    p.add_argument("--dry-run", action="store_true", help="check the run file and print the stages; run nothing")
    p.add_argument("--smoke", action="store_true", help="every stage at toy size, into RUN_DIR-smoke")
    p.add_argument(
        "--from",
        dest="start",
        choices=STAGES,
        help="redo this stage and every one after it; the ones before are taken as done (e.g. trained on a cluster)",
    )
    p.add_argument("--only", choices=STAGES, help="run this stage alone (redone whatever its record says)")
    args = p.parse_args(argv)
    setup_logging()

    def body() -> None:
        if args.start and args.only:
            raise UserError("--from and --only: give one")
        run = load_run(args.config, args.set, smoke=args.smoke)
        warn_stale_build_locks(log)
        check_deepspeed_json(run.train.deepspeed)
        runner = Runner(run, args.start, args.only)
        if args.dry_run:
            for stage in runner.stages():
                record = runner.record(stage.name)
                current = record.get("fingerprint") == stage.fingerprint and record.get("complete")
                state = "not needed" if not stage.wanted else "up to date" if current else "to run"
                print(f"{stage.name:<7} {state}")
            print(f"{args.config}: OK ({run.gpus} rank(s), outputs under {run.run_dir})")
            return
        runner.execute()

    return run_cli(body, log)


if __name__ == "__main__":
    sys.exit(main())
