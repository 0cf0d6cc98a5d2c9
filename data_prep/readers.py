"""Streaming readers: files in, validated documents (or counted rejects) out, in a fixed order.

The order is the sorted list of resolved input files, then the order within
each file, so every worker and every shard of a split job sees the same stream.
Nothing here holds more than one record (or one Parquet/Arrow batch) in memory.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cpt_core.errors import InputError, UserError
from cpt_core.typed_config import setting

from .documents import Document, Reject, content_digest

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".json.gz", ".json")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst", ".md", ".md.gz", ".rst", ".rst.gz")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
KNOWN_SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class ReadOptions:
    """How records become documents. Defaults suit a plain ``{"text": ...}`` jsonl corpus."""

    instruction: bool = setting(False, "records are prompt/response or chat examples (set by the source's role)")
    text_field: str = setting("text", "field holding a document's text")
    prompt_field: str = setting("prompt", "field holding an instruction example's prompt")
    response_field: str = setting("response", "field holding an instruction example's response")
    messages_field: str = setting("messages", "field holding a chat example's messages")
    txt_mode: Literal["file", "line"] = setting("file", "file: a .txt file is one document; line: each non-empty line")
    max_doc_chars: int = setting(5_000_000, "longer documents are rejected, not silently truncated")
    max_docs: int = setting(0, "read only the first this many records of the source, in file order; 0: all")


def resolve_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand globs and directories into a sorted, de-duplicated list of input paths.

    A directory that is a saved ``datasets`` dataset (it holds ``state.json``) is
    one input; any other directory contributes every known file beneath it.
    """
    found: set[str] = set()
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise UserError(f"{pattern}: no such file, directory or glob match")
        for match in matches:
            p = Path(match)
            if p.is_dir() and (p / "state.json").is_file():
                found.add(str(p))
            elif p.is_dir():
                found.update(str(f) for f in sorted(p.rglob("*")) if f.is_file() and _known(f.name))
            else:
                if not _known(p.name):
                    raise InputError(
                        str(p),
                        f"unknown file type; expected one of {', '.join(KNOWN_SUFFIXES)} or a saved datasets directory",
                    )
                found.add(str(p))
    if not found:
        raise UserError(f"no input files found in {list(patterns)}")
    return sorted(found)


def read_documents(paths: list[str], options: ReadOptions) -> Iterator[Document | Reject]:
    """Yield every record of every path as a Document or a Reject, in stream order (the first
    ``options.max_docs`` of them where that is set)."""
    records = itertools.chain.from_iterable(_read_path(path, options) for path in paths)
    yield from itertools.islice(records, options.max_docs or None)


def _known(name: str) -> bool:
    return name.lower().endswith(KNOWN_SUFFIXES)


def _read_path(path: str, options: ReadOptions) -> Iterator[Document | Reject]:
    name = path.lower()
    if os.path.isdir(path):
        records: Iterator[tuple[int, Any]] = _iter_saved_dataset(path)
    elif name.endswith(PARQUET_SUFFIXES):
        records = _iter_parquet(path)
    elif name.endswith(ARROW_SUFFIXES):
        records = _iter_arrow_file(path)
    elif name.endswith(JSONL_SUFFIXES) or name.endswith(TEXT_SUFFIXES):
        raw = _open_bytes(path)
        head = raw.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES] if hasattr(raw, "peek") else b""
        if b"\x00" in head:
            raw.close()
            yield Reject(path, None, "binary file (NUL bytes in its first 8 KiB); skipped whole")
            return
        with raw:
            if name.endswith(JSONL_SUFFIXES):
                yield from _iter_jsonl(path, raw, options)
            else:
                yield from _iter_text(path, raw, options)
        return
    else:  # resolve_inputs already refuses these; kept for direct callers
        raise InputError(path, "unknown file type")
    for line, record in records:
        yield _validate(path, line, record, options)


def _open_bytes(path: str) -> io.BufferedReader:
    if path.lower().endswith(".gz"):
        return io.BufferedReader(gzip.open(path, "rb"))  # type: ignore[arg-type]
    if path.lower().endswith(".zst"):
        import zstandard  # optional: only .zst inputs need it

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))  # type: ignore[arg-type]
    return open(path, "rb")


def _iter_jsonl(path: str, raw: io.BufferedReader, options: ReadOptions) -> Iterator[Document | Reject]:
    try:
        for line_no, line in enumerate(raw, start=1):
            if not line.strip():
                continue
            try:
                decoded = line.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Reject(path, line_no, f"invalid UTF-8 at byte {e.start}")
                continue
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError as e:
                yield Reject(path, line_no, f"malformed JSON: {e.msg} at column {e.colno}")
                continue
            yield _validate(path, line_no, record, options)
    except (EOFError, OSError) as e:  # truncated .gz / .zst
        yield Reject(path, None, f"file is truncated or corrupt after the last good line: {e}")


def _iter_text(path: str, raw: io.BufferedReader, options: ReadOptions) -> Iterator[Document | Reject]:
    if options.instruction:
        raise InputError(path, "instruction data must be jsonl/parquet/arrow with prompt/response or messages")
    if options.txt_mode == "line":
        yield from _iter_jsonl_like_lines(path, raw, options)
        return
    data = raw.read(options.max_doc_chars * 4 + 1)
    if len(data) > options.max_doc_chars * 4:
        yield Reject(path, None, f"document too long (over {options.max_doc_chars} characters)")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        yield Reject(path, None, f"invalid UTF-8 at byte {e.start}")
        return
    yield _validate(path, 1, {options.text_field: text}, options)


def _iter_jsonl_like_lines(path: str, raw: io.BufferedReader, options: ReadOptions) -> Iterator[Document | Reject]:
    for line_no, line in enumerate(raw, start=1):
        try:
            text = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            yield Reject(path, line_no, f"invalid UTF-8 at byte {e.start}")
            continue
        if text.strip():
            yield _validate(path, line_no, {options.text_field: text}, options)


def _iter_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq  # each format loads its reader only when a file of it is read

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise InputError(path, f"cannot open as Parquet: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _iter_arrow_file(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    source = pa.memory_map(path)
    try:
        reader: Any = ipc.open_file(source)
        batches: Iterable[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        try:
            batches = ipc.open_stream(source)
        except pa.ArrowInvalid as e:
            raise InputError(path, f"cannot open as Arrow: {e}") from None
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _iter_saved_dataset(path: str) -> Iterator[tuple[int, Any]]:
    import datasets  # seconds to import; only saved-dataset inputs need it

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises a zoo of types for a broken directory
        raise InputError(path, f"cannot load as a saved datasets directory: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise InputError(path, f"is a DatasetDict with splits {list(ds)}; point at one split's directory")
    row = 0
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        for i in range(len(batch[keys[0]]) if keys else 0):
            row += 1
            yield row, {k: batch[k][i] for k in keys}


def _validate(path: str, line: int, record: Any, options: ReadOptions) -> Document | Reject:
    if not isinstance(record, dict):
        return Reject(path, line, f"expected a JSON object, got {type(record).__name__}")
    if options.instruction:
        return _validate_instruction(path, line, record, options)
    if options.text_field not in record:
        return Reject(path, line, f"missing field '{options.text_field}' (fields: {', '.join(sorted(record))})")
    text = record[options.text_field]
    problem = _text_problem(text, options)
    if problem:
        return Reject(path, line, f"field '{options.text_field}': {problem}")
    return Document(path, line, text=text, digest=content_digest(text, None))


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _validate_instruction(path: str, line: int, record: dict[str, Any], options: ReadOptions) -> Document | Reject:
    """An instruction example as (role, content) turns. Layouts: chat ``messages`` (role/content), ShareGPT
    ``conversations`` (from/value), ``prompt`` + ``response``, and Alpaca ``instruction`` + ``output`` with an
    optional ``input`` joined to the instruction after a blank line, as Alpaca's own template does."""
    if options.messages_field in record or "conversations" in record:
        sharegpt = options.messages_field not in record
        field, role_key, content_key = (
            ("conversations", "from", "value")
            if sharegpt
            else (
                options.messages_field,
                "role",
                "content",
            )
        )
        raw = record[field]
        if not isinstance(raw, list) or not raw:
            return Reject(path, line, f"field '{field}' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or role_key not in m or content_key not in m:
                return Reject(path, line, f"message {i} needs '{role_key}' and '{content_key}'")
            role = SHAREGPT_ROLES.get(str(m[role_key])) if sharegpt else str(m[role_key])
            if role is None:
                return Reject(path, line, f"message {i}: unknown '{role_key}' {m[role_key]!r}")
            problem = _text_problem(m[content_key], options)
            if problem:
                return Reject(path, line, f"message {i} {content_key}: {problem}")
            messages.append((role, m[content_key]))
        if not any(role == "assistant" for role, _ in messages):
            return Reject(path, line, "no assistant message: nothing would carry loss")
    elif _has(record, options.prompt_field, options.response_field) or _has(record, "instruction", "output"):
        prompt_key, response_key = (
            (options.prompt_field, options.response_field)
            if _has(record, options.prompt_field, options.response_field)
            else ("instruction", "output")
        )
        for key in (prompt_key, response_key):
            problem = _text_problem(record[key], options)
            if problem:
                return Reject(path, line, f"field '{key}': {problem}")
        prompt = record[prompt_key]
        extra = record.get("input") if prompt_key == "instruction" else None  # Alpaca's layout only
        if extra is not None and not isinstance(extra, str):
            return Reject(path, line, f"field 'input' is {type(extra).__name__}, not a string")
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        messages = [("user", prompt), ("assistant", record[response_key])]
    else:
        return Reject(
            path,
            line,
            f"needs '{options.messages_field}', 'conversations', '{options.prompt_field}'+'{options.response_field}' "
            f"or 'instruction'+'output' (fields: {', '.join(sorted(record))})",
        )
    frozen = tuple(messages)
    return Document(path, line, messages=frozen, digest=content_digest(None, frozen))


def _has(record: dict[str, Any], *keys: str) -> bool:
    return all(k in record for k in keys)


def _text_problem(text: Any, options: ReadOptions) -> str | None:
    if text is None:
        return "is null"
    if not isinstance(text, str):
        return f"is {type(text).__name__}, not a string"
    if not text.strip():
        return "is empty"
    if len(text) > options.max_doc_chars:
        return f"document too long ({len(text)} characters > max_doc_chars {options.max_doc_chars})"
    if "\x00" in text:
        return "contains NUL characters"
    return None
