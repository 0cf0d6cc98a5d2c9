"""The prepare config: one YAML file for the whole data prep, validated with clear errors.

Relative paths are taken relative to the config file, so a config and its data
can move together. Unknown keys are errors (a typo must not silently fall back
to a default), and every error names the file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cpt_core.errors import ConfigError
from cpt_core.typed_config import build, read_yaml, reference, setting

from .build import BuildOptions, SourceSpec
from .documents import Role
from .readers import ReadOptions


@dataclass(frozen=True)
class MixConfig:
    """Token shares of the training mixture."""

    general_ratio: float = setting(0.15, "share of tokens from general data; 0.10-0.20 is typical")
    instruction_ratio: float = setting(0.0, "share from instruction data (CPT and SFT in one run)")
    batch_rows: int = setting(64, "global batch (rows) the shares are stratified over")


@dataclass(frozen=True)
class ReplayShardConfig:
    """The GeRe replay shard: general documents the trainer replays every step."""

    source: str = setting("", "name of a general source; empty: the first general source")
    num_samples: int = setting(1000, "documents in the shard (GeRe uses ~1000)")
    replay_len: int = setting(512, "tokens kept per document")
    selection: Literal["random", "first"] = setting("random", "random documents, or the first ones (as GeRe does)")
    probe_docs: int = setting(
        0, "more documents set apart (never trained on, replayed or scored) for the trainer's forgetting.budget"
    )


@dataclass(frozen=True)
class HoldoutConfig:
    """Held-out evaluation documents, never packed into training rows."""

    fraction: float = setting(0.01, "share of each source's documents")
    max_docs: int = setting(1000, "cap per source")


@dataclass(frozen=True)
class PrepareTop:
    """The top level of a prepare config (``sources``, ``mix``, ``replay``, ``holdout`` and the build options aside)."""

    tokenizer: str = setting(doc="SentencePiece .model file or Hugging Face tokenizer (or model) directory")
    out: str = setting(doc="output directory: cache/, mixture/, replay/, holdout/, prep.json")
    workers: int = setting(1, "tokenizer processes")


@dataclass(frozen=True)
class SourceEntry:
    """One corpus under ``sources``; reading options (below) may sit beside these keys."""

    name: str = setting(doc="the source's name (names its build and its row ids)")
    role: Role = setting(doc="what the documents are for")
    paths: tuple[str, ...] = setting(doc="files, directories or globs (one string is one path)")
    dedup: bool = setting(True, "drop exact duplicate documents")


@dataclass(frozen=True)
class PrepareConfig:
    tokenizer: str
    out: str
    sources: tuple[SourceSpec, ...]
    build: BuildOptions = BuildOptions()
    workers: int = 1
    mix: MixConfig = MixConfig()
    replay: ReplayShardConfig | None = ReplayShardConfig()
    holdout: HoldoutConfig = HoldoutConfig()


READ_KEYS = {f.name for f in dataclasses.fields(ReadOptions)} - {"instruction"}  # instruction: from the role
SOURCE_KEYS = {f.name for f in dataclasses.fields(SourceEntry)} | READ_KEYS
BUILD_KEYS = {f.name for f in dataclasses.fields(BuildOptions)}
TOP_KEYS = {f.name for f in dataclasses.fields(PrepareTop)} | {"sources", "mix", "replay", "holdout"} | BUILD_KEYS


def load_config(path: str | Path) -> PrepareConfig:
    return parse_config(read_yaml(path), base=Path(path).parent, origin=str(path))


def parse_config(raw: dict[str, Any], base: Path, origin: str) -> PrepareConfig:
    _no_unknown(raw, TOP_KEYS, origin, "")
    top = build(PrepareTop, {k: v for k, v in raw.items() if k in {"tokenizer", "out", "workers"}}, "", origin)
    if not isinstance(raw.get("sources"), list) or not raw["sources"]:
        raise ConfigError(f"{origin}: 'sources' must be a non-empty list")
    holdout = build(HoldoutConfig, raw.get("holdout", {}), "holdout.", origin)
    sources = tuple(_source(s, i, base, origin, holdout) for i, s in enumerate(raw["sources"]))
    build_options = build(BuildOptions, {k: v for k, v in raw.items() if k in BUILD_KEYS}, "", origin)
    replay_raw = raw.get("replay", {})
    replay = (
        None if replay_raw is None or replay_raw is False else build(ReplayShardConfig, replay_raw, "replay.", origin)
    )
    cfg = PrepareConfig(
        tokenizer=str(base / top.tokenizer),
        out=str(base / top.out),
        sources=sources,
        build=build_options,
        workers=top.workers,
        mix=build(MixConfig, raw.get("mix", {}), "mix.", origin),
        replay=replay,
        holdout=holdout,
    )
    validate(cfg, origin)
    return cfg


def validate(cfg: PrepareConfig, origin: str) -> None:
    """Bounds that types cannot say, each error naming the file and the key."""

    def need(ok: bool, name: str, value: Any, rule: str) -> None:
        if not ok:
            raise ConfigError(f"{origin}: {name} must be {rule}, got {value!r}")

    need(cfg.workers >= 1, "workers", cfg.workers, ">= 1")
    need(0 <= cfg.mix.general_ratio < 1, "mix.general_ratio", cfg.mix.general_ratio, "in [0, 1)")
    need(0 <= cfg.mix.instruction_ratio < 1, "mix.instruction_ratio", cfg.mix.instruction_ratio, "in [0, 1)")
    need(cfg.mix.batch_rows >= 1, "mix.batch_rows", cfg.mix.batch_rows, ">= 1")
    need(0 <= cfg.holdout.fraction < 1, "holdout.fraction", cfg.holdout.fraction, "in [0, 1)")
    need(cfg.holdout.max_docs >= 0, "holdout.max_docs", cfg.holdout.max_docs, ">= 0")
    if cfg.replay is not None:
        need(cfg.replay.num_samples >= 1, "replay.num_samples", cfg.replay.num_samples, ">= 1")
        need(cfg.replay.replay_len >= 2, "replay.replay_len", cfg.replay.replay_len, ">= 2")
        need(cfg.replay.probe_docs >= 0, "replay.probe_docs", cfg.replay.probe_docs, ">= 0")


def config_reference() -> str:
    """The prepare config's sections, as the docs show them."""
    sections = [
        reference(PrepareTop, "Top level (`data_prep prepare --config`)"),
        reference(BuildOptions, "Top level: build options (part of each build's cache key)"),
        reference(SourceEntry, "`sources[i]`", "sources[i]."),
        reference(ReadOptions, "`sources[i]`: reading options", "sources[i].", skip={"instruction"}),
    ]
    sections += [
        reference(cls, f"`{name}`", f"{name}.")
        for name, cls in (("mix", MixConfig), ("replay", ReplayShardConfig), ("holdout", HoldoutConfig))
    ]
    return "\n".join(sections)


def _source(raw: Any, i: int, base: Path, origin: str, holdout: HoldoutConfig) -> SourceSpec:
    where = f"sources[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {where} must be a mapping")
    _no_unknown(raw, SOURCE_KEYS, origin, where + ".")
    entry_raw = {k: v for k, v in raw.items() if k not in READ_KEYS}
    if isinstance(entry_raw.get("paths"), str):
        entry_raw["paths"] = [entry_raw["paths"]]
    entry = build(SourceEntry, entry_raw, where + ".", origin)
    read = build(ReadOptions, {k: v for k, v in raw.items() if k in READ_KEYS}, where + ".", origin)
    return SourceSpec(
        name=entry.name,
        role=entry.role,
        paths=tuple(str(base / p) for p in entry.paths),
        read=read,
        dedup=entry.dedup,
        holdout_fraction=holdout.fraction,
        holdout_max_docs=holdout.max_docs,
    )


def _no_unknown(raw: dict[str, Any], known: set[str], origin: str, prefix: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{origin}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})")
