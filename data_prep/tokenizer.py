"""One tokenizer interface over a SentencePiece ``.model`` or a local Hugging Face tokenizer dir.

Two ways to encode, because text has two origins:

* ``encode_batch``: raw documents. Each starts the way the tokenizer itself
  starts a text (``bos_ids``: Gemma's and Llama-3's tokenizers add BOS, so the
  model sees it in training, replay and holdout as at inference), and a
  control-token literal written in the text (``<|im_end|>``) stays text: it
  must never become an EOS or turn marker mid-document.
* ``encode_rendered``: the output of the tokenizer's own chat template, whose
  markup *is* control tokens; nothing is prepended (templates write their BOS).

The fingerprint hashes the tokenizer's files, so a packed cache built with one
tokenizer is never mistaken for another's. No remote code is ever loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from cpt_core.errors import UserError

log = logging.getLogger(__name__)

# Everything a Hugging Face tokenizer directory may hold, and nothing else: a model directory doubles as
# its tokenizer directory, so whoever copies "the tokenizer" copies exactly these (never weights or config.json).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class Tokenizer(Protocol):
    path: str
    fingerprint: str
    eos_id: int
    vocab_size: int
    bos_ids: tuple[int, ...]  # what the tokenizer puts before every text it encodes (often BOS, often nothing)

    def encode_batch(self, texts: Sequence[str], start: bool = True) -> list[list[int]]:
        """Raw documents: ``bos_ids`` (unless ``start`` is False) + the text, control-token literals as text."""
        ...

    def encode_rendered(self, texts: Sequence[str]) -> list[list[int]]:
        """Chat-template renderings: control tokens parsed, nothing prepended."""
        ...

    def special_literals(self, text: str) -> list[str]:
        """The control-token strings written in ``text`` (encoded as text by ``encode_batch``)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str | None:
        """The chat template's rendering, or None when the tokenizer has no template."""
        ...


class SentencePieceTokenizer:
    """SentencePiece model; ``num_threads=1`` so that one worker process uses one core."""

    def __init__(self, path: str, num_threads: int = 1) -> None:
        import sentencepiece as spm  # each tokenizer kind loads only its own library

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
        # A .model file states no convention; SentencePiece's own encode adds nothing and never parses
        # control pieces out of text, so raw and rendered text encode alike.
        self.bos_ids: tuple[int, ...] = ()

    def encode_batch(self, texts: Sequence[str], start: bool = True) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=self._threads)

    def encode_rendered(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encode_batch(texts)

    def special_literals(self, text: str) -> list[str]:
        return []

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def render_chat(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str | None:
        return None


def save_sentencepiece_as_hf(model_file: str | Path, out: Path) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` beside a SentencePiece model, so ``AutoTokenizer`` loads
    an export with neither sentencepiece nor protobuf installed.

    transformers' converter reads the pieces, scores and byte fallback; its normalizer assumes SentencePiece's
    default whitespace handling, so it is replaced by the one this model states (spaces kept as they are) and
    SentencePiece's word split (a run of spaces starts a word). The Viterbi search can break a tie between
    equal-score segmentations differently (a long run of one repeated character): the pieces then differ while
    the text they decode to is the same.
    """
    import sentencepiece as spm
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    class Source:  # what SpmConverter reads from a slow tokenizer
        vocab_file = str(model_file)
        legacy = False
        add_prefix_space = False

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    backend = SpmConverter(Source()).converted()
    # the converter's Unigram drops byte fallback: characters the pieces miss would become <unk>, not bytes
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    byte_fallback = any(sp.is_byte(i) for i in range(sp.get_piece_size()))
    backend.model = Unigram(vocab, sp.unk_id(), byte_fallback=byte_fallback)
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("▁+[^▁]*|[^▁]+"), behavior="isolated")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    probes = ["Hello world", " two  spaces\tand a tab\n", "digits 12345, café, 中文", "end."]
    if any(sp.encode(t) != backend.encode(t, add_special_tokens=False).ids for t in probes):
        log.warning(
            "%s normalizes text in a way tokenizer.json cannot reproduce here (its model states other whitespace "
            "or Unicode rules); the export keeps tokenizer.model alone",
            model_file,
        )
        return
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=piece(sp.bos_id()),
        eos_token=piece(sp.eos_id()),
        unk_token=piece(sp.unk_id()),
    )
    fast.save_pretrained(str(out))


class HFTokenizer:
    """A local Hugging Face tokenizer directory, loaded with ``trust_remote_code=False``."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer  # seconds to import; SentencePiece jobs never pay it

        self.path = str(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False, local_files_only=True)
        except (OSError, ValueError) as e:  # how transformers reports a directory it cannot read
            raise UserError(f"{path}: cannot load Hugging Face tokenizer: {e}") from None
        if self._tok.eos_token_id is None:
            raise UserError(f"{path}: tokenizer defines no eos_token; documents could not be separated")
        self.eos_id = int(self._tok.eos_token_id)
        self.vocab_size = len(self._tok)
        files = [Path(self.path) / f for f in HF_TOKENIZER_FILES if (Path(self.path) / f).is_file()]
        self.fingerprint = _hash_files(files)
        self.bos_ids = self._start_convention()
        specials = sorted(
            {t for t in self._tok.all_special_tokens}
            | {str(t) for t in getattr(self._tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)},
            key=len,
            reverse=True,
        )
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None

    def _start_convention(self) -> tuple[int, ...]:
        """The ids the tokenizer adds before a text (its post-processor), read off a probe."""
        probe = "Hello"
        plain = self._tok(probe, add_special_tokens=False)["input_ids"]
        full = self._tok(probe)["input_ids"]
        start = next((k for k in range(len(full) - len(plain) + 1) if full[k : k + len(plain)] == plain), 0)
        return tuple(int(i) for i in full[:start])

    def encode_batch(self, texts: Sequence[str], start: bool = True) -> list[list[int]]:
        ids = self._tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [list(self.bos_ids) + x for x in ids] if self.bos_ids and start else ids

    def encode_rendered(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False, split_special_tokens=False)["input_ids"]

    def special_literals(self, text: str) -> list[str]:
        return self._special_re.findall(text) if self._special_re is not None else []

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
        raise UserError(
            f"{p}: tokenizer not found (expected a SentencePiece .model file or a Hugging Face tokenizer directory)"
        )
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
