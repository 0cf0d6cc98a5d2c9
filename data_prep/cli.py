"""Command line: ``python -m data_prep <command>``; ``--help`` on each command explains it.

User errors (bad input, bad options) print one line naming the file and exit 2;
anything else is a bug and keeps its traceback. Each command imports its modules
when it runs, so ``--help`` and a light command (``stats``) never load the
tokenizers or ``datasets``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cpt_core.commands import prog
from cpt_core.errors import UserError, run_cli
from cpt_core.logs import setup_logging
from cpt_core.typed_config import add_flags

from . import __version__
from .build import BuildOptions
from .config import HoldoutConfig, MixConfig, PrepareTop, ReplayShardConfig, SourceEntry
from .readers import ReadOptions

log = logging.getLogger("data_prep")

DEMO_DIR = "runs/demo"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    return run_cli(
        lambda: args.run(args), log, interrupted="interrupted; finished chunks are kept and a rerun resumes from them"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog("data_prep"),
        description=(
            "Offline data prep for continued pretraining: tokenize and pack corpora into Arrow rows of exactly "
            "seq_len tokens, mix domain/general/instruction data at exact token shares, and build the GeRe replay "
            "shard and held-out eval splits. Start with `demo` (no download needed) or `prepare --config`."
        ),
    )
    p.add_argument("--version", action="version", version=f"data_prep {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, run: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            parents=[common],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sp.set_defaults(run=run)
        return sp

    build = add("build", "Tokenize and pack one source into a cached, resumable per-source build.", _cmd_build)
    _source_args(build)
    add_flags(build, PrepareTop, ["tokenizer"])
    build.add_argument("--cache", required=True, help="cache root; the build goes to CACHE/ROLE/NAME-KEY/")
    add_flags(build, BuildOptions, ["seq_len", "seed", "docs_per_chunk", "max_reject_fraction"])
    add_flags(build, HoldoutConfig, ["fraction", "max_docs"], prefix="holdout_")
    add_flags(build, PrepareTop, ["workers"])
    build.add_argument(
        "--num-shards", type=int, default=1, help="split the job into K independent pieces (SLURM array)"
    )
    build.add_argument("--shard-index", type=int, default=0, help="which piece this job runs, 0..K-1")

    merge = add("merge", "Finish a build split into pieces: check every chunk exists and write build.json.", _cmd_merge)
    merge.add_argument("build_dir", help="the build directory the pieces wrote to")

    mix = add("mix", "Write the training mixture from builds at exact, per-batch-stratified token shares.", _cmd_mix)
    mix.add_argument("builds", nargs="+", help="build directories (their role comes from build.json)")
    mix.add_argument("--out", required=True, help="output directory (data/ + manifest.json)")
    add_flags(mix, MixConfig, ["general_ratio", "instruction_ratio", "batch_rows"])
    add_flags(mix, BuildOptions, ["seed"])

    replay = add(
        "replay", "Sample N general documents into the GeRe replay shard (each alone, truncated).", _cmd_replay
    )
    _source_args(replay, role="general")
    add_flags(replay, PrepareTop, ["tokenizer"])
    replay.add_argument("--out", required=True, help="output directory (data/ + replay.json)")
    add_flags(replay, ReplayShardConfig, ["num_samples", "replay_len", "selection"])
    add_flags(replay, BuildOptions, ["seed"])
    replay.add_argument(
        "--disjoint-from",
        nargs="*",
        default=[],
        metavar="BUILD",
        help="builds whose documents (training and holdout) are never sampled; `prepare` does this for you",
    )

    holdout = add("holdout", "Gather the held-out documents of builds into per-role eval splits.", _cmd_holdout)
    holdout.add_argument("builds", nargs="+", help="build directories")
    holdout.add_argument("--out", required=True, help="output directory (ROLE/ + holdout.json)")
    holdout.add_argument(
        "--allow-overlap", action="store_true", help="allow holdout docs that occur in other sources' train"
    )

    stats = add("stats", "Summarise a build or mixture: rows, tokens, shares, segment lengths.", _cmd_stats)
    stats.add_argument("path", help="mixture, saved dataset or build directory")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    inspect = add("inspect", "Decode one packed row, segment by segment (no-loss tokens in ⟦ ⟧).", _cmd_inspect)
    inspect.add_argument("path", help="mixture, saved dataset or build directory")
    inspect.add_argument("--row", type=int, default=0, help="row index")
    inspect.add_argument("--tokenizer", required=True, help="tokenizer the data was built with")

    prepare = add("prepare", "Run the whole prep (build, mix, holdout, replay) from one YAML config.", _cmd_prepare)
    prepare.add_argument("--config", required=True, help="YAML config (see README: Data prep config)")
    prepare.add_argument(
        "--num-shards",
        type=int,
        default=1,
        help="only build piece --shard-index of K (SLURM array); then run once unsplit to finish",
    )
    prepare.add_argument("--shard-index", type=int, default=0, help="which piece this job builds, 0..K-1")

    demo = add("demo", "Sample corpora from Python's own stdlib and docs, train a tokenizer, run prepare.", _cmd_demo)
    demo.add_argument("--out", default=DEMO_DIR, help="demo directory")
    demo.add_argument("--small", action="store_true", help="a smaller corpus (CI / quick look)")
    demo.add_argument("--workers", type=int, default=2, help="tokenizer worker processes")
    demo.add_argument(
        "--tokenizer",
        help="use this tokenizer (e.g. your Hugging Face model directory) instead of "
        "training a SentencePiece one on the sample",
    )
    return p


def _source_args(p: argparse.ArgumentParser, role: str | None = None) -> None:
    """The source's flags; ``role``: the role's default (else ``--role`` is required)."""
    add_flags(p, SourceEntry, ["name", "role"], defaults={"role": role} if role else None)
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        dest="inputs",
        help="files, directories or globs: jsonl[.gz|.zst], parquet, txt, arrow, saved datasets",
    )
    add_flags(p, ReadOptions, ["text_field", "txt_mode", "max_doc_chars"])
    add_flags(p, SourceEntry, ["dedup"])


def _spec(args: argparse.Namespace, holdout: tuple[float, int] = (0.0, 0)):
    from .build import SourceSpec

    read = ReadOptions(text_field=args.text_field, txt_mode=args.txt_mode, max_doc_chars=args.max_doc_chars)
    return SourceSpec(
        name=args.name,
        role=args.role,
        paths=tuple(args.inputs),
        read=read,
        dedup=args.dedup,
        holdout_fraction=holdout[0],
        holdout_max_docs=holdout[1],
    )


def _cmd_build(args: argparse.Namespace) -> None:
    from .build import build_source

    if args.workers < 0 or args.num_shards < 1:
        raise UserError("--workers must be >= 0 and --num-shards >= 1")
    options = BuildOptions(
        seq_len=args.seq_len,
        seed=args.seed,
        docs_per_chunk=args.docs_per_chunk,
        max_reject_fraction=args.max_reject_fraction,
    )
    out = build_source(
        _spec(args, (args.holdout_fraction, args.holdout_max_docs)),
        options,
        args.tokenizer,
        args.cache,
        workers=args.workers,
        num_shards=args.num_shards,
        shard_index=args.shard_index,
        quiet=args.quiet,
    )
    print(out)


def _cmd_merge(args: argparse.Namespace) -> None:
    from cpt_core.atomic import remove_stale_temporaries

    from .build import finalize

    remove_stale_temporaries(args.build_dir)  # merge runs once every piece has finished: no other writer
    finalize(args.build_dir)
    print(args.build_dir)


def _cmd_mix(args: argparse.Namespace) -> None:
    from .mix import mix

    mix(
        args.builds,
        args.out,
        args.general_ratio,
        args.instruction_ratio,
        seed=args.seed,
        batch_rows=args.batch_rows,
        quiet=args.quiet,
    )


def _cmd_replay(args: argparse.Namespace) -> None:
    from .replay import build_replay

    build_replay(
        _spec(args),
        args.tokenizer,
        args.out,
        args.num_samples,
        args.replay_len,
        args.selection,
        args.seed,
        disjoint_from=args.disjoint_from,
        quiet=args.quiet,
    )


def _cmd_holdout(args: argparse.Namespace) -> None:
    from .holdout import build_holdout

    build_holdout(args.builds, args.out, allow_overlap=args.allow_overlap)


def _cmd_stats(args: argparse.Namespace) -> None:
    from .stats import format_summary, summarize

    s = summarize(args.path)
    print(json.dumps(s, indent=2) if args.json else format_summary(s))


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .stats import inspect_row
    from .tokenizer import load_tokenizer

    print(inspect_row(args.path, args.row, load_tokenizer(args.tokenizer)))


def _cmd_prepare(args: argparse.Namespace) -> None:
    from .config import load_config
    from .prepare import prepare

    summary = prepare(
        load_config(args.config), quiet=args.quiet, num_shards=args.num_shards, shard_index=args.shard_index
    )
    if summary is not None:
        print(json.dumps(summary.achieved_token_share))


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import build_demo_data

    build_demo_data(Path(args.out), small=args.small, workers=args.workers, quiet=args.quiet, tokenizer=args.tokenizer)


if __name__ == "__main__":
    sys.exit(main())
