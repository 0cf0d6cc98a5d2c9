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

from .build import BuildOptions, SourceSpec
from .errors import ConfigError
from .readers import ReadOptions
from .typed_config import build, read_yaml, reference, setting


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


@dataclass(frozen=True)
class HoldoutConfig:
    """Held-out evaluation documents, never packed into training rows."""

    fraction: float = setting(0.01, "share of each source's documents")
    max_docs: int = setting(1000, "cap per source")


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


SOURCE_KEYS = {"name", "role", "paths", "dedup"} | {f.name for f in dataclasses.fields(ReadOptions)} - {"instruction"}
BUILD_KEYS = {f.name for f in dataclasses.fields(BuildOptions)}
TOP_KEYS = {"tokenizer", "out", "sources", "workers", "mix", "replay", "holdout"} | BUILD_KEYS


def load_config(path: str | Path) -> PrepareConfig:
    return parse_config(read_yaml(path), base=Path(path).parent, origin=str(path))


def parse_config(raw: dict[str, Any], base: Path, origin: str) -> PrepareConfig:
    _no_unknown(raw, TOP_KEYS, origin, "")
    for key in ("tokenizer", "out", "sources"):
        if key not in raw:
            raise ConfigError(f"{origin}: missing required key '{key}'")
    if not isinstance(raw["sources"], list) or not raw["sources"]:
        raise ConfigError(f"{origin}: 'sources' must be a non-empty list")
    holdout = build(HoldoutConfig, raw.get("holdout", {}), "holdout.", origin)
    sources = tuple(_source(s, i, base, origin, holdout) for i, s in enumerate(raw["sources"]))
    build_options = build(BuildOptions, {k: v for k, v in raw.items() if k in BUILD_KEYS}, "", origin)
    replay_raw = raw.get("replay", {})
    replay = (
        None if replay_raw is None or replay_raw is False else build(ReplayShardConfig, replay_raw, "replay.", origin)
    )
    workers = raw.get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"{origin}: 'workers' must be an integer >= 1, got {workers!r}")
    return PrepareConfig(
        tokenizer=str(base / raw["tokenizer"]),
        out=str(base / raw["out"]),
        sources=sources,
        build=build_options,
        workers=workers,
        mix=build(MixConfig, raw.get("mix", {}), "mix.", origin),
        replay=replay,
        holdout=holdout,
    )


def config_reference() -> str:
    """The prepare config's sections, as the docs show them."""
    top = reference(
        BuildOptions, "Top level (`data_prep prepare --config`; besides `tokenizer`, `out`, `sources`, `workers`)"
    )
    source = reference(ReadOptions, "`sources[i]` (besides `name`, `role`, `paths`, `dedup`)", "sources[i].")
    return "\n".join(
        [top, source]
        + [
            reference(cls, f"`{name}`", f"{name}.")
            for name, cls in (("mix", MixConfig), ("replay", ReplayShardConfig), ("holdout", HoldoutConfig))
        ]
    )


def _source(raw: Any, i: int, base: Path, origin: str, holdout: HoldoutConfig) -> SourceSpec:
    where = f"sources[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {where} must be a mapping")
    _no_unknown(raw, SOURCE_KEYS, origin, where + ".")
    for key in ("name", "role", "paths"):
        if key not in raw:
            raise ConfigError(f"{origin}: {where} is missing '{key}'")
    paths = raw["paths"] if isinstance(raw["paths"], list) else [raw["paths"]]
    read = build(
        ReadOptions,
        {k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(ReadOptions)}},
        where + ".",
        origin,
    )
    return SourceSpec(
        name=str(raw["name"]),
        role=str(raw["role"]),
        paths=tuple(str(base / p) for p in paths),
        read=read,
        dedup=bool(raw.get("dedup", True)),
        holdout_fraction=holdout.fraction,
        holdout_max_docs=holdout.max_docs,
    )


def _no_unknown(raw: dict[str, Any], known: set[str], origin: str, prefix: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{origin}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})")
