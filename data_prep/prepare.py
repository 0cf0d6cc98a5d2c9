"""prepare: the whole data prep from one config — build every source, mix, replay, holdout.

Holdout, replay shard and training rows never share a document: the replay
samples are chosen first, outside the holdout, and their source is built
without them (``data_prep/replay.py``).

The layout of ``out`` is :class:`data_prep.prep_dir.PrepDir`'s.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from cpt_core.atomic import remove_stale_temporaries
from cpt_core.errors import UserError

from .build import HoldoutSplit, SourceSpec, build_source
from .config import PrepareConfig
from .documents import Document
from .holdout import build_holdout
from .mix import mix
from .prep_dir import PrepDir, PrepIndex
from .replay import (
    ReplaySelection,
    overlap_with_builds,
    refuse_overlap,
    select_replay,
    write_probe,
    write_replay,
)

log = logging.getLogger(__name__)


def prepare(cfg: PrepareConfig, quiet: bool = False, num_shards: int = 1, shard_index: int = 0) -> PrepIndex | None:
    """Run the whole prep; with ``num_shards > 1`` only build this piece's chunks and return None.

    A SLURM array runs every piece; one dependent job then runs it unsplit, which
    finds every chunk built, finalizes the builds and does mix, holdout and replay.
    """
    out = PrepDir(cfg.out)
    if num_shards == 1:  # the one writer of these: leftovers of a killed run go, so a rerun ends byte-identical
        out.invalidate()  # a prep is complete again only when this run finishes
        for directory in out.output_dirs():
            remove_stale_temporaries(directory)
    replay_spec, chosen, probe_documents = _replay_choice(cfg, quiet)
    reserved = chosen.digests | {d.digest for d in probe_documents}
    builds = {
        s.name: str(
            build_source(
                replace(s, reserved=reserved) if s is replay_spec else s,
                cfg.build,
                cfg.tokenizer,
                out.cache,
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
    if replay_spec is not None:  # before anything is written: the same text in another source cannot be avoided
        overlap = overlap_with_builds(reserved, list(builds.values()))
        refuse_overlap(replay_spec, overlap, list(builds.values()))
    manifest = mix(
        list(builds.values()),
        out.mixture,
        cfg.mix.general_ratio,
        cfg.mix.instruction_ratio,
        seed=cfg.build.seed,
        batch_rows=cfg.mix.batch_rows,
        quiet=quiet,
    )
    holdout = build_holdout(list(builds.values()), out.holdout)
    replay = probe = None
    if replay_spec is not None:
        if probe_documents:
            probe = out.probe
            write_probe(probe_documents, replay_spec, cfg.tokenizer, probe)
        replay = write_replay(
            chosen,
            replay_spec,
            cfg.tokenizer,
            out.replay,
            cfg.replay.num_samples,
            cfg.replay.replay_len,
            cfg.replay.selection,
            cfg.build.seed,
            list(builds.values()),
            overlap,
        )
    index = PrepIndex(
        mixture=out.mixture,
        replay=out.replay if replay else None,
        holdout={role: out.holdout / role for role in holdout["splits"]},
        tokenizer=Path(cfg.tokenizer),
        seq_len=cfg.build.seq_len,
        builds={name: Path(b) for name, b in builds.items()},
        probe=probe,
        achieved_token_share=manifest["achieved_token_share"],
        rows=manifest["rows"],
    )
    out.write(index)
    log.info("prepare: done → %s", out.index_path)
    return index


def _replay_choice(cfg: PrepareConfig, quiet: bool) -> tuple[SourceSpec | None, ReplaySelection, list[Document]]:
    """The replay source, its replay documents and probe documents, outside its holdout; chosen before the source
    is built, so the build leaves them out (every piece of a split prepare chooses the same ones)."""
    if cfg.replay is None:
        return None, ReplaySelection([], 0, 0), []
    general = [s for s in cfg.sources if s.role == "general"]
    name = cfg.replay.source or (general[0].name if general else "")
    spec = next((s for s in cfg.sources if s.name == name), None)
    if spec is None:
        raise UserError(f"replay.source '{name}' is not one of the sources {[s.name for s in cfg.sources]}")
    chosen = select_replay(
        spec,
        cfg.replay.num_samples + cfg.replay.probe_docs,
        cfg.replay.selection,
        cfg.build.seed,
        holdout=HoldoutSplit.of(spec, cfg.build.seed),
        quiet=quiet,
    )
    if not chosen.documents:
        raise UserError(f"source '{spec.name}': no usable documents outside its holdout to sample replay data from")
    _check_what_replay_leaves(cfg, spec, chosen)
    replay, probe = chosen.set_apart(cfg.replay.probe_docs, cfg.build.seed, at_random=cfg.replay.selection == "random")
    return spec, replay, probe


def _check_what_replay_leaves(cfg: PrepareConfig, spec: SourceSpec, chosen: ReplaySelection) -> None:
    """Say where a source's documents went when the replay shard takes most of them, before any build; refuse
    when it leaves the mix none of the general share it asks for."""
    assert cfg.replay is not None
    if cfg.replay.selection != "random":  # 'first' stops reading at its quota, so it does not know what is left
        return
    taken, usable = len(chosen.documents), chosen.seen
    if taken * 2 <= usable:
        return
    spent = (
        f"source '{spec.name}': the replay shard (replay.num_samples {cfg.replay.num_samples} + replay.probe_docs "
        f"{cfg.replay.probe_docs}) takes {taken} of its {usable} usable documents outside the holdout, leaving "
        f"{usable - taken} to train on"
    )
    other_general = any(s.role == "general" and s.name != spec.name for s in cfg.sources)
    if usable == taken and spec.role == "general" and cfg.mix.general_ratio > 0 and not other_general:
        raise UserError(
            f"{spent}, but mix.general_ratio {cfg.mix.general_ratio} needs general rows: lower replay.num_samples, "
            "point replay.source at another general source, add general documents, or set mix.general_ratio 0"
        )
    log.warning("%s", spent)
