"""The forgetting bench's rows, read from YAML files (bench/rows/): each is naive CPT plus training-config
overrides, and a row's definition is that data, so a changed row reruns. A row is compared with the naive CPT
row of its lr (the row with no overrides and no mix), found by its definition, never by its name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cpt_core.errors import ConfigError
from pipeline.config import CACHED_STRATEGIES

ROWS_DIR = Path(__file__).resolve().parent / "rows"
DEFAULT_ROWS = ROWS_DIR / "default.yaml"
ROLES = ("default", "gere")  # what cpt init and the demo run; GeRe's recipe, reported beside it
ROW_KEYS = {"name", "mixed", "lr_mult", "config", "role"}


@dataclass(frozen=True)
class Row:
    name: str
    mixed: bool  # the 15% general mix, or domain rows only
    extra: dict[str, Any] = field(default_factory=dict)  # training-config overrides; "merge": after training
    lr_mult: float = 1.0
    role: str | None = None

    @property
    def definition(self) -> dict[str, Any]:
        """What a stored result was run with: a row whose definition changed is run again."""
        return definition(self.mixed, self.extra, self.lr_mult)

    @property
    def is_naive(self) -> bool:
        return self.definition == definition(False, {}, self.lr_mult)

    @property
    def holds_budget(self) -> bool:
        """A forgetting budget moves the row's weights (and lr): its fixed-weight siblings are its yardstick."""
        return self.extra.get("forgetting", {}).get("budget") is not None

    @property
    def watched(self) -> bool:
        """Probed and logged with the weights fixed (``forgetting: {watch: true}``)."""
        return bool(self.extra.get("forgetting", {}).get("watch"))

    @property
    def reads_cache(self) -> bool:
        """Whether the row's replay strategy reads the base model's GeRe cache."""
        return self.extra.get("replay", {}).get("strategy") in CACHED_STRATEGIES


def definition(mixed: bool, extra: dict[str, Any], lr_mult: float) -> dict[str, Any]:
    return {"mixed": mixed, "extra": extra, "lr_mult": lr_mult}


def load_rows(*paths: str | Path) -> list[Row]:
    """The rows of ``paths`` in order; a bad entry names its file and index, a name used twice is refused."""
    rows: list[Row] = []
    for path in paths:
        raw = _read_list(Path(path))
        for i, entry in enumerate(raw):
            where = f"{path}: row {i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ConfigError(f"{where}: a mapping with a name, got {entry!r}")
            unknown = set(entry) - ROW_KEYS
            if unknown:
                raise ConfigError(
                    f"{where} ({entry['name']}): unknown keys {sorted(unknown)}; known {sorted(ROW_KEYS)}"
                )
            if entry.get("role") not in (None, *ROLES):
                raise ConfigError(f"{where} ({entry['name']}): role is one of {ROLES}, got {entry['role']!r}")
            if any(r.name == entry["name"] for r in rows):
                raise ConfigError(f"{where}: a row named {entry['name']!r} is already defined")
            config = entry.get("config") or {}
            if not isinstance(config, dict):
                raise ConfigError(f"{where} ({entry['name']}): config is a mapping of training-config overrides")
            lr_mult = float(entry.get("lr_mult", 1.0))
            rows.append(Row(entry["name"], bool(entry.get("mixed", False)), config, lr_mult, entry.get("role")))
    return rows


def _read_list(path: Path) -> list[Any]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: rows file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: a list of rows (name, mixed, lr_mult, config, role)")
    return raw


def naive_name(definitions: dict[str, dict[str, Any]], name: str) -> str | None:
    """The naive CPT row at ``name``'s lr, by the stored definitions (``results["definitions"]``)."""
    if name not in definitions:
        return None
    lr_mult = definitions[name]["lr_mult"]
    return next((n for n, d in definitions.items() if d == definition(False, {}, lr_mult)), None)


def with_role(rows: list[Row], role: str) -> Row | None:
    return next((r for r in rows if r.role == role), None)


def at_each_lr(rows: list[Row], row: Row) -> list[Row]:
    """``row`` and the rows that differ from it only in lr, by lr."""
    same = [r for r in rows if (r.mixed, r.extra) == (row.mixed, row.extra)]
    return sorted(same, key=lambda r: r.lr_mult)


def without_weights(extra: dict[str, Any]) -> dict[str, Any]:
    """A row's options with the replay and KD weights (and a budget or a watch) left out: what its fixed-weight
    siblings share."""
    out = {k: v for k, v in extra.items() if k != "forgetting"}
    for key in ("replay", "kd"):
        if key in out:
            out[key] = {k: v for k, v in out[key].items() if k != "weight"}
    return out
