"""The embedded default: real corpora and a tokenizer from text that ships with Python.

* domain  — standard-library ``.py`` sources (code: a domain the prose-trained base has not seen much of);
* general — English prose: the language reference topics of ``pydoc_data`` and stdlib docstrings;
* instruction — "what does X do?" pairs from function docstrings (half prompt/response, half messages).

Output is byte-for-byte reproducible for one Python version (sorted walk, gzip
mtime 0), so the build cache stays valid between runs. The tokenizer is a
SentencePiece model trained to be lossless on code: identity normalisation,
whitespace kept, newline a piece of its own, byte fallback for the rest.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cpt_core.atomic import atomic_path

log = logging.getLogger(__name__)

SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "turtledemo",
    "__pycache__",
    "ensurepip",
    "tkinter",
    "config-3",
    "venv",
}


@dataclass(frozen=True)
class SampleSizes:
    """Caps in characters; the defaults give a demo corpus of a few MB that tokenizes in seconds."""

    domain_chars: int = 4_000_000
    general_chars: int = 2_000_000
    max_file_chars: int = 60_000
    instruction_examples: int = 2000
    vocab_size: int = 4096


SMALL = SampleSizes(
    domain_chars=400_000, general_chars=300_000, max_file_chars=20_000, instruction_examples=200, vocab_size=1024
)


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def write_sample_corpora(out: str | os.PathLike[str], sizes: SampleSizes = SampleSizes()) -> dict[str, Path]:
    """Write domain/general/instruction jsonl(.gz) under ``out``; returns their paths by role."""
    out = Path(out)
    root = Path(sysconfig.get_paths()["stdlib"])
    domain, general, instruction = [], [], []
    used = {"domain": 0, "general": 0}
    for topic, text in sorted(_pydoc_topics().items()):
        if used["general"] < sizes.general_chars and text.strip():
            general.append({"text": text.strip(), "source": f"pydoc_data:{topic}"})
            used["general"] += len(text)
    for path in stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        rel = path.relative_to(root).as_posix()
        if used["domain"] < sizes.domain_chars and 200 < len(source) <= sizes.max_file_chars:
            domain.append({"text": source, "source": rel})
            used["domain"] += len(source)
        for name, doc in _docstrings(tree):
            if len(doc) > 200 and used["general"] < sizes.general_chars:
                general.append({"text": doc, "source": f"{rel}:{name}"})
                used["general"] += len(doc)
        if len(instruction) < sizes.instruction_examples:
            instruction.extend(_instruction_pairs(rel, tree, sizes.instruction_examples - len(instruction)))
        if (
            all(used[r] >= getattr(sizes, f"{r}_chars") for r in used)
            and len(instruction) >= sizes.instruction_examples
        ):
            break
    paths = {
        "domain": out / "domain.jsonl.gz",
        "general": out / "general.jsonl.gz",
        "instruction": out / "instruction.jsonl",
    }
    for role, rows in (("domain", domain), ("general", general), ("instruction", instruction)):
        _write_jsonl(paths[role], rows)
    log.info(
        "sample corpora: %d domain files (%d chars), %d general docs (%d chars), %d instruction examples → %s",
        len(domain),
        used["domain"],
        len(general),
        used["general"],
        len(instruction),
        out,
    )
    return paths


def train_sample_tokenizer(corpora: list[Path], out_model: str | os.PathLike[str], vocab_size: int = 4096) -> Path:
    """Train a lossless SentencePiece model on the sample corpora (~20 s at 4096 pieces).

    One thread: SentencePiece's multi-threaded training gives a different model on each run,
    and everything downstream (packed rows, the demo's figures) should be reproducible.
    """
    import sentencepiece as spm  # only the demo trains a tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(corpora),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n", "\t"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    with atomic_path(out_model) as tmp:
        tmp.write_bytes(model.getvalue())
    return Path(out_model)


def _lines(corpora: list[Path]) -> Iterator[str]:
    """Training sentences: every non-empty line, with its newline as the piece that joins lines."""
    for path in corpora:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for record in f:
                for line in json.loads(record).get("text", "").split("\n"):
                    if line.strip():
                        yield line[:4000]


def _docstrings(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """Module, class and function docstrings: the stdlib's English prose, in source order."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield getattr(node, "name", "<module>"), doc


def _instruction_pairs(rel: str, tree: ast.Module, limit: int) -> Iterator[dict[str, object]]:
    module = rel[:-3].replace("/", ".").removesuffix(".__init__")
    n = 0
    for node in tree.body:
        if n >= limit:
            return
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40:
                continue
            answer = doc.split("\n\n")[0].strip()[:400]
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            question = f"What does the {kind} `{module}.{node.name}` do?"
            if n % 2:
                yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            else:
                yield {"prompt": question, "response": answer}
            n += 1


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics  # absent from some Python builds
    except ImportError:  # some distributions strip pydoc_data; docstrings still give prose
        return {}
    return dict(topics)


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with atomic_path(path) as tmp:
        if path.suffix == ".gz":
            with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
                gz.write(data)
        else:
            tmp.write_bytes(data)
