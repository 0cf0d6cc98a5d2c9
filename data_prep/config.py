"""The prepare config: one YAML file for the whole data prep, validated with clear errors.

Relative paths are taken relative to the config file, so a config and its data
can move together. Unknown keys are errors (a typo must not silently fall back
to a default), and every error names the file and the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .build import BuildOptions, SourceSpec
from .errors import InputError, UserError
from .readers import ReadOptions


@dataclass(frozen=True)
class MixConfig:
    general_ratio: float = 0.15  # share of tokens from general data; 0.10-0.20 is typical
    instruction_ratio: float = 0.0  # share from instruction data (CPT and SFT in one run)
    batch_rows: int = 64  # global batch (rows) the stratification is checked against


@dataclass(frozen=True)
class ReplayConfig:
    source: str = ""  # name of a general source; default: the first general source
    num_samples: int = 1000
    replay_len: int = 512
    selection: str = "random"  # or "first", as the GeRe paper does


@dataclass(frozen=True)
class HoldoutConfig:
    fraction: float = 0.01  # of each source's documents
    max_docs: int = 1000  # per source


@dataclass(frozen=True)
class PrepareConfig:
    tokenizer: str
    out: str
    sources: tuple[SourceSpec, ...]
    build: BuildOptions = BuildOptions()
    workers: int = 1
    mix: MixConfig = MixConfig()
    replay: ReplayConfig | None = ReplayConfig()
    holdout: HoldoutConfig = HoldoutConfig()


SOURCE_KEYS = {"name", "role", "paths", "dedup"} | {f.name for f in dataclasses.fields(ReadOptions)} - {"instruction"}
TOP_KEYS = {"tokenizer", "out", "sources", "workers", "mix", "replay", "holdout"} | {
    f.name for f in dataclasses.fields(BuildOptions)}


def load_config(path: str | Path) -> PrepareConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(str(path), f"invalid YAML: {getattr(e, 'problem', e)}",
                         line=mark.line + 1 if mark else None) from None
    if not isinstance(raw, dict):
        raise InputError(str(path), "expected a mapping at the top level")
    return parse_config(raw, base=path.parent, origin=str(path))


def parse_config(raw: dict[str, Any], base: Path, origin: str) -> PrepareConfig:
    _no_unknown(raw, TOP_KEYS, origin, "")
    for key in ("tokenizer", "out", "sources"):
        if key not in raw:
            raise UserError(f"{origin}: missing required key '{key}'")
    if not isinstance(raw["sources"], list) or not raw["sources"]:
        raise UserError(f"{origin}: 'sources' must be a non-empty list")
    holdout = _section(HoldoutConfig, raw.get("holdout", {}), origin, "holdout")
    sources = tuple(_source(s, i, base, origin, holdout) for i, s in enumerate(raw["sources"]))
    build = _section(BuildOptions, {k: raw[k] for k in raw if k in {f.name for f in dataclasses.fields(BuildOptions)}},
                     origin, "")
    replay_raw = raw.get("replay", {})
    replay = None if replay_raw is None or replay_raw is False else _section(ReplayConfig, replay_raw, origin, "replay")
    workers = raw.get("workers", 1)
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"{origin}: 'workers' must be an integer >= 1, got {workers!r}")
    return PrepareConfig(tokenizer=str(base / raw["tokenizer"]), out=str(base / raw["out"]), sources=sources,
                         build=build, workers=workers, mix=_section(MixConfig, raw.get("mix", {}), origin, "mix"),
                         replay=replay, holdout=holdout)


def _source(raw: Any, i: int, base: Path, origin: str, holdout: HoldoutConfig) -> SourceSpec:
    where = f"sources[{i}]"
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: {where} must be a mapping")
    _no_unknown(raw, SOURCE_KEYS, origin, where + ".")
    for key in ("name", "role", "paths"):
        if key not in raw:
            raise UserError(f"{origin}: {where} is missing '{key}'")
    paths = raw["paths"] if isinstance(raw["paths"], list) else [raw["paths"]]
    read = ReadOptions(**{k: v for k, v in raw.items() if k in {f.name for f in dataclasses.fields(ReadOptions)}})
    return SourceSpec(name=str(raw["name"]), role=str(raw["role"]), paths=tuple(str(base / p) for p in paths),
                      read=read, dedup=bool(raw.get("dedup", True)), holdout_fraction=holdout.fraction,
                      holdout_max_docs=holdout.max_docs)


def _section(cls: Any, raw: Any, origin: str, name: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: '{name}' must be a mapping")
    _no_unknown(raw, {f.name for f in dataclasses.fields(cls)}, origin, f"{name}." if name else "")
    for f in dataclasses.fields(cls):
        if f.name in raw and f.default is not dataclasses.MISSING and raw[f.name] is not None:
            expected = type(f.default)
            value = raw[f.name]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                continue
            if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
                raise UserError(f"{origin}: '{name + '.' if name else ''}{f.name}' must be {expected.__name__}, "
                                f"got {value!r}")
    return cls(**raw)


def _no_unknown(raw: dict[str, Any], known: set[str], origin: str, prefix: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{origin}: unknown key '{prefix}{unknown[0]}' (known: {', '.join(sorted(known))})")


