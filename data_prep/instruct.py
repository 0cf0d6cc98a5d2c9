"""Instruction examples → token ids + loss mask (loss on assistant tokens only).

With a chat template the tokenizer's own rendering is used; the text is split at
each assistant turn by rendering growing prefixes of the conversation, so the
mask follows the template exactly. Without one, a simple documented template:

    <|user|>\n{content}\n<|assistant|>\n{content}{EOS}

where only the assistant content and the EOS after the last assistant turn
carry loss. Pieces are tokenized separately and concatenated; that is stable
across runs but may differ by a token from tokenizing the joined string.
"""
from __future__ import annotations

from typing import Sequence

from .tokenizer import Tokenizer

Messages = Sequence[tuple[str, str]]


def render_pieces(tokenizer: Tokenizer, messages: Messages) -> list[tuple[str, bool]]:
    """Split a conversation into ``(text, carries_loss)`` pieces whose concatenation is the rendering."""
    full = tokenizer.render_chat(messages, add_generation_prompt=False)
    if full is None:
        pieces: list[tuple[str, bool]] = []
        for role, content in messages:
            pieces.append((f"<|{role}|>\n", False))
            pieces.append((content + ("" if role == "assistant" else "\n"), role == "assistant"))
            if role == "assistant":
                pieces.append(("\n", False))
        if pieces and pieces[-1] == ("\n", False):
            pieces.pop()  # the EOS that ends the example takes the final newline's place
        return pieces
    pieces = []
    done = ""
    for i, (role, _) in enumerate(messages):
        if role == "assistant":
            prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True) or ""
            if prompt[len(done):]:
                pieces.append((prompt[len(done):], False))
            upto = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False) or ""
            pieces.append((upto[len(prompt):], True))
            done = upto
    if full[len(done):]:
        pieces.append((full[len(done):], False))
    return pieces


def encode_examples(tokenizer: Tokenizer, examples: Sequence[Messages]) -> list[tuple[list[int], list[int]]]:
    """Tokenize examples in one batch call; each gets ``(ids, loss_mask)`` ending in EOS."""
    rendered = [render_pieces(tokenizer, ex) for ex in examples]
    flat = [text for pieces in rendered for text, _ in pieces]
    ids_flat = tokenizer.encode_batch(flat) if flat else []
    out: list[tuple[list[int], list[int]]] = []
    k = 0
    for pieces in rendered:
        ids: list[int] = []
        mask: list[int] = []
        for _, loss in pieces:
            ids.extend(ids_flat[k])
            mask.extend([int(loss)] * len(ids_flat[k]))
            k += 1
        ends_with_answer = bool(pieces) and pieces[-1][1]
        ids.append(tokenizer.eos_id)
        mask.append(int(ends_with_answer))
        out.append((ids, mask))
    return out
