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
from cpt_core.typed_config import build, did_you_mean, read_yaml, reference, setting

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
    workers: int = setting(1, "tokenizer processes (reading overlaps with them; 0: all in this process)")


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


def parse_config(raw: dict[str, Any], base: Path, origin: str, errors: list[str] | None = None) -> PrepareConfig | None:
    """The prepare config from a mapping; the first problem raised, or with ``errors`` every problem appended
    there (and None returned if there was one)."""
    found: list[str] = []
    _no_unknown(raw, TOP_KEYS, origin, "", found)
    top = build(PrepareTop, {k: v for k, v in raw.items() if k in {"tokenizer", "out", "workers"}}, "", origin, found)
    holdout = build(HoldoutConfig, raw.get("holdout", {}), "holdout.", origin, found)
    sources_raw = raw.get("sources")
    if not isinstance(sources_raw, list) or not sources_raw:
        found.append(f"{origin}: 'sources' must be a non-empty list")
        sources_raw = []
    sources = [_source(s, i, base, origin, holdout or HoldoutConfig(), found) for i, s in enumerate(sources_raw)]
    build_options = build(BuildOptions, {k: v for k, v in raw.items() if k in BUILD_KEYS}, "", origin, found)
    replay_raw = raw.get("replay", {})
    replay = (
        None
        if replay_raw is None or replay_raw is False
        else build(ReplayShardConfig, replay_raw, "replay.", origin, found)
    )
    mix = build(MixConfig, raw.get("mix", {}), "mix.", origin, found)
    found += _bounds(top, mix, holdout, replay, origin)
    if found:
        if errors is None:
            raise ConfigError(found[0])
        errors.extend(found)
        return None
    return PrepareConfig(
        tokenizer=str(base / top.tokenizer),
        out=str(base / top.out),
        sources=tuple(sources),
        build=build_options,
        workers=top.workers,
        mix=mix,
        replay=replay,
        holdout=holdout,
    )


def _bounds(
    top: PrepareTop | None,
    mix: MixConfig | None,
    holdout: HoldoutConfig | None,
    replay: ReplayShardConfig | None,
    origin: str,
) -> list[str]:
    """Bounds that types cannot say, each naming the file and the key (sections that failed to parse skipped)."""
    found: list[str] = []

    def need(ok: bool, name: str, value: Any, rule: str) -> None:
        if not ok:
            found.append(f"{origin}: {name} must be {rule}, got {value!r}")

    if top is not None:
        need(top.workers >= 1, "workers", top.workers, ">= 1")
    if mix is not None:
        need(0 <= mix.general_ratio < 1, "mix.general_ratio", mix.general_ratio, "in [0, 1)")
        need(0 <= mix.instruction_ratio < 1, "mix.instruction_ratio", mix.instruction_ratio, "in [0, 1)")
        need(mix.batch_rows >= 1, "mix.batch_rows", mix.batch_rows, ">= 1")
    if holdout is not None:
        need(0 <= holdout.fraction < 1, "holdout.fraction", holdout.fraction, "in [0, 1)")
        need(holdout.max_docs >= 0, "holdout.max_docs", holdout.max_docs, ">= 0")
    if replay is not None:
        need(replay.num_samples >= 1, "replay.num_samples", replay.num_samples, ">= 1")
        need(replay.replay_len >= 2, "replay.replay_len", replay.replay_len, ">= 2")
        need(replay.probe_docs >= 0, "replay.probe_docs", replay.probe_docs, ">= 0")
    return found


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


def _source(raw: Any, i: int, base: Path, origin: str, holdout: HoldoutConfig, found: list[str]) -> SourceSpec | None:
    where = f"sources[{i}]"
    if not isinstance(raw, dict):
        found.append(f"{origin}: {where} must be a mapping")
        return None
    _no_unknown(raw, SOURCE_KEYS, origin, where + ".", found)
    entry_raw = {k: v for k, v in raw.items() if k not in READ_KEYS}
    if isinstance(entry_raw.get("paths"), str):
        entry_raw["paths"] = [entry_raw["paths"]]
    entry = build(SourceEntry, entry_raw, where + ".", origin, found)
    read = build(ReadOptions, {k: v for k, v in raw.items() if k in READ_KEYS}, where + ".", origin, found)
    if entry is None or read is None:
        return None
    if read.max_docs < 0:
        found.append(f"{origin}: {where}.max_docs must be >= 0, got {read.max_docs}")
    return SourceSpec(
        name=entry.name,
        role=entry.role,
        paths=tuple(str(base / p) for p in entry.paths),
        read=read,
        dedup=entry.dedup,
        holdout_fraction=holdout.fraction,
        holdout_max_docs=holdout.max_docs,
    )


def _no_unknown(raw: dict[str, Any], known: set[str], origin: str, prefix: str, found: list[str]) -> None:
    for key in sorted(set(raw) - known):
        found.append(f"{origin}: unknown key '{prefix}{key}'{did_you_mean(str(key), known)}")
