"""prepare: the whole data prep from one config — build every source, mix, replay, holdout.

Layout under ``out``:
    cache/<role>/<name>-<key>/   per-source packed chunks (reused across runs and ratios)
    mixture/data + manifest.json training rows in training order
    replay/data + replay.json    GeRe replay shard
    holdout/<role>/ + holdout.json
    prep.json                    where everything is; what pipeline.train reads
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from . import __version__
from .atomic import remove_stale_temporaries, write_json
from .build import build_source
from .config import PrepareConfig
from .errors import UserError
from .holdout import build_holdout
from .mix import mix
from .replay import build_replay

log = logging.getLogger(__name__)


def prepare(
    cfg: PrepareConfig, quiet: bool = False, num_shards: int = 1, shard_index: int = 0
) -> dict[str, Any] | None:
    """Run the whole prep; with ``num_shards > 1`` only build this piece's chunks and return None.

    A SLURM array runs every piece; one dependent job then runs it unsplit, which
    finds every chunk built, finalizes the builds and does mix, holdout and replay.
    """
    out = Path(cfg.out)
    if num_shards == 1:  # the one writer of these: leftovers of a killed run go, so a rerun ends byte-identical
        for directory in (out, out / "mixture", out / "holdout", out / "replay"):
            remove_stale_temporaries(directory)
    builds = {
        s.name: str(
            build_source(
                s,
                cfg.build,
                cfg.tokenizer,
                out / "cache",
                workers=cfg.workers,
                num_shards=num_shards,
                shard_index=shard_index,
                quiet=quiet,
            )
        )
        for s in cfg.sources
    }
    if num_shards > 1:
        log.info("prepare: piece %d/%d built; run prepare unsplit once all pieces finish", shard_index + 1, num_shards)
        return None
    manifest = mix(
        list(builds.values()),
        out / "mixture",
        cfg.mix.general_ratio,
        cfg.mix.instruction_ratio,
        seed=cfg.build.seed,
        batch_rows=cfg.mix.batch_rows,
        quiet=quiet,
    )
    holdout = build_holdout(list(builds.values()), out / "holdout")
    replay = None
    if cfg.replay is not None:
        general = [s for s in cfg.sources if s.role == "general"]
        name = cfg.replay.source or (general[0].name if general else "")
        spec = next((s for s in cfg.sources if s.name == name), None)
        if spec is None:
            raise UserError(f"replay.source '{name}' is not one of the sources {[s.name for s in cfg.sources]}")
        replay = build_replay(
            spec,
            cfg.tokenizer,
            out / "replay",
            cfg.replay.num_samples,
            cfg.replay.replay_len,
            cfg.replay.selection,
            cfg.build.seed,
            check_against=list(builds.values()),
            quiet=quiet,
        )
    summary = {
        "version": __version__,
        "tokenizer": cfg.tokenizer,
        "seq_len": cfg.build.seq_len,
        "mixture": str(out / "mixture"),
        "replay": str(out / "replay") if replay else None,
        "holdout": {role: str(out / "holdout" / role) for role in holdout["splits"]},
        "builds": builds,
        "achieved_token_share": manifest["achieved_token_share"],
        "rows": manifest["rows"],
    }
    write_json(out / "prep.json", summary)
    log.info("prepare: done → %s", out / "prep.json")
    return summary
