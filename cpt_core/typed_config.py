"""Typed configs from YAML: the one loader behind ``data_prep prepare --config`` and ``pipeline.train --config``.

A config is a tree of dataclasses whose fields are declared with ``setting``:
a default, a type annotation (``Literal[...]`` for a choice) and a docstring.
From that single declaration come the validation (unknown keys, wrong types,
values outside a ``Literal`` are refused, naming the key), the ``--help-config``
reference and ``docs/config.md``, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError, InputError


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A config field: its default (or ``factory`` for a nested section) and the one sentence users read."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"doc": doc})


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file or a syntax error names the file (and line)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(
            str(path), f"invalid YAML: {getattr(e, 'problem', e)}", line=mark.line + 1 if mark else None
        ) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(str(path), "expected a mapping at the top level")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    """Apply ``key.path=value`` overrides in place; values are parsed as YAML (``1e-5``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' must look like key.path=value")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(value)


def build(
    cls: Any,
    raw: Any,
    prefix: str = "",
    origin: str = "",
    errors: list[str] | None = None,
    overridden: frozenset[str] = frozenset(),
) -> Any:
    """An instance of dataclass ``cls`` from a mapping, every value checked against its annotation.

    ``origin`` (a file name) prefixes every error; ``prefix`` is the dotted path of this section; a key in
    ``overridden`` came from ``--set`` and its errors say so. With an ``errors`` list every problem is
    appended there (and None returned if there was one) instead of the first being raised.
    """
    found: list[str] = [] if errors is None else errors
    before = len(found)

    def problem(key: str, message: str) -> None:
        where = "--set " if key in overridden else f"{origin}: " if origin else ""
        if errors is None:
            raise ConfigError(where + message)
        found.append(where + message)

    if not isinstance(raw, dict):
        problem(prefix.rstrip("."), f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {raw!r}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in sorted(set(raw) - set(fields)):
        problem(f"{prefix}{key}", f"unknown key '{prefix}{key}'{did_you_mean(str(key), fields)}")
    for name, f in fields.items():
        if name not in raw and _is_required(f):
            problem(f"{prefix}{name}", f"missing required key '{prefix}{name}'")
    values = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        section = _section_type(hints[name])
        if section is not None and (value is not None or not _optional(hints[name])):
            values[name] = build(section, value, f"{prefix}{name}.", origin, errors, overridden)
        else:
            try:
                values[name] = coerce(value, hints[name], f"{prefix}{name}")
            except ConfigError as e:
                problem(f"{prefix}{name}", str(e))
    return None if len(found) > before else cls(**values)


def did_you_mean(key: str, known: typing.Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a near miss, else the known keys."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f" (known: {', '.join(known)})"


def coerce(value: Any, annotation: Any, name: str) -> Any:
    """``value`` checked against a type annotation (made a float where one is due)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return coerce(value, option, name)
                except ConfigError:
                    pass
        raise ConfigError(f"{name} must be {describe(annotation)}, got {value!r}")
    if value is None:
        raise ConfigError(f"{name} must not be null")
    if origin is Literal:
        if value in typing.get_args(annotation) and not isinstance(value, bool):
            return value
    elif annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    elif annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif annotation in (str, bool) and isinstance(value, annotation):
        return value
    elif origin is dict and isinstance(value, dict):
        return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        (item, *_) = typing.get_args(annotation)
        return tuple(coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value))
    raise ConfigError(f"{name} must be {describe(annotation)}, got {value!r}")


def describe(annotation: Any) -> str:
    """A type annotation as a user reads it: ``cosine | linear | constant``, ``a number or null``."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return " | ".join(str(v) for v in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is dict:
        return "a mapping"
    if origin is tuple:
        return f"a list of {describe(typing.get_args(annotation)[0]).removeprefix('a ').removeprefix('an ')}s"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(
        annotation, str(annotation)
    )


def choices(cls: Any, name: str) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` field, for code that branches on them."""
    annotation = typing.get_type_hints(cls)[name]
    options = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
    for a in typing.get_args(annotation) if not options else ():
        if typing.get_origin(a) is Literal:
            options += typing.get_args(a)
    return options


def reference(cls: Any, title: str, prefix: str = "", skip: set[str] = frozenset()) -> str:
    """A markdown reference of every field under ``cls`` but ``skip``: key, type, default, doc (a table per section)."""
    rows, sections = [], []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        section = _section_type(hints[f.name])
        if section is not None:
            sections.append(reference(section, f"`{prefix}{f.name}`", f"{prefix}{f.name}."))
            continue
        default = "required" if _is_required(f) else f"`{json.dumps(_default(f))}`"
        cells = (f"`{prefix}{f.name}`", describe(hints[f.name]), default, f.metadata.get("doc", ""))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    head = [f"### {title}", "", doc, ""] if doc else [f"### {title}", ""]
    table = ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""] if rows else []
    return "\n".join(head + table + sections)


def add_flags(
    parser: argparse.ArgumentParser,
    cls: Any,
    names: typing.Iterable[str],
    prefix: str = "",
    defaults: dict[str, Any] | None = None,
) -> None:
    """A ``--PREFIX-NAME`` flag for each named field of ``cls``, its type, choices, default and help taken from
    the field's declaration, so a command's ``--help`` says what the YAML reference says. A boolean gets
    ``--NAME`` and ``--no-NAME``; a field without a default is a required flag, unless ``defaults`` (by field
    name) gives this command one."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = defaults or {}
    for name in names:
        f, annotation = fields[name], hints[name]
        flag = "--" + (prefix + name).replace("_", "-")
        options: dict[str, Any] = {"dest": prefix + name, "help": f.metadata.get("doc", "")}
        if name in defaults or not _is_required(f):
            options["default"] = defaults.get(name, _default(f))
        else:
            options["required"] = True
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is Literal:
            options["choices"] = typing.get_args(annotation)
        elif typing.get_origin(annotation) is tuple:
            options["nargs"], options["type"] = "+", typing.get_args(annotation)[0]
        else:
            options["type"] = annotation
        parser.add_argument(flag, **options)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _optional(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _section_type(annotation: Any) -> Any:
    """The dataclass of a nested section (``X`` or ``X | None``), else None."""
    candidates = typing.get_args(annotation) if _optional(annotation) else (annotation,)
    for c in candidates:
        if dataclasses.is_dataclass(c):
            return c
    return None
