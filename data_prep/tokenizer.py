"""One tokenizer interface over a SentencePiece ``.model`` or a local Hugging Face tokenizer dir.

The fingerprint hashes the tokenizer's files, so a packed cache built with one
tokenizer is never mistaken for another's. No remote code is ever loaded.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, Sequence

from .errors import UserError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja")


class Tokenizer(Protocol):
    path: str
    fingerprint: str
    eos_id: int
    vocab_size: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str | None:
        """The chat template's rendering, or None when the tokenizer has no template."""
        ...


class SentencePieceTokenizer:
    """SentencePiece model; ``num_threads=1`` so that one worker process uses one core."""

    def __init__(self, path: str, num_threads: int = 1) -> None:
        import sentencepiece as spm

        self.path = str(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path}: cannot load SentencePiece model: {e}") from None
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise UserError(f"{path}: SentencePiece model has no EOS piece; train it with eos_id >= 0")
        self.vocab_size = int(self._sp.get_piece_size())
        self.fingerprint = _hash_files([Path(self.path)])
        self._threads = num_threads

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self._threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def render_chat(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str | None:
        return None


class HFTokenizer:
    """A local Hugging Face tokenizer directory, loaded with ``trust_remote_code=False``."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.path = str(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot load Hugging Face tokenizer: {e}") from None
        if self._tok.eos_token_id is None:
            raise UserError(f"{path}: tokenizer defines no eos_token; documents could not be separated")
        self.eos_id = int(self._tok.eos_token_id)
        self.vocab_size = len(self._tok)
        files = [Path(self.path) / f for f in HF_TOKENIZER_FILES if (Path(self.path) / f).is_file()]
        self.fingerprint = _hash_files(files)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def render_chat(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str | None:
        if not getattr(self._tok, "chat_template", None):
            return None
        chat = [{"role": r, "content": c} for r, c in messages]
        return self._tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer from a ``.model`` file or a Hugging Face directory, with a clear error."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: tokenizer not found (expected a SentencePiece .model file or a "
                        "Hugging Face tokenizer directory)")
    if p.is_file():
        return SentencePieceTokenizer(str(p))
    if not any((p / f).is_file() for f in HF_TOKENIZER_FILES):
        raise UserError(f"{p}: directory holds no tokenizer files ({', '.join(HF_TOKENIZER_FILES[:3])}, ...)")
    return HFTokenizer(str(p))


def _hash_files(files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.name):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
