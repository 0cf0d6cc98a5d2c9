"""Instruction examples → token ids + loss mask (loss on assistant tokens only).

With a chat template the tokenizer's own rendering is used; the text is split at
each assistant turn by rendering growing prefixes of the conversation, so the
mask follows the template exactly. That needs every rendering to extend the
previous one (the prompt's rendering is a prefix of the conversation's);
templates that rewrite earlier turns (e.g. dropping past reasoning) break it,
and the example is refused with an error naming the turn, rather than trained
with a misplaced mask. The rendering is encoded with its control tokens
parsed; the tokenizer's start ids (BOS) are prepended unless the template
wrote them. When the template's end of turn is already the EOS, the example
ends there (the EOS carries loss, so the model learns to stop); otherwise an
EOS is appended. Either way there is exactly one end token, never two.

Without a template, a simple documented one:

    <|user|>\\n{content}\\n<|assistant|>\\n{content}{EOS}

where only the assistant content and the EOS after the last assistant turn
carry loss; its markup and contents are encoded as plain text. Pieces are
tokenized separately and concatenated; that is stable across runs but may
differ by a token from tokenizing the joined string.
"""

from __future__ import annotations

from collections.abc import Sequence

from cpt_core.errors import UserError

from .tokenizer import Tokenizer

Messages = Sequence[tuple[str, str]]


class TemplateError(UserError):
    """The chat template's renderings do not extend each other, so the loss mask cannot be placed."""


def render_pieces(tokenizer: Tokenizer, messages: Messages) -> tuple[list[tuple[str, bool]], bool]:
    """Split a conversation into ``(text, carries_loss)`` pieces whose concatenation is the rendering.

    The flag says whether the tokenizer's chat template rendered it (its markup is control tokens).
    """
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
        return pieces, False
    pieces = []
    done = ""
    for i, (role, _) in enumerate(messages):
        if role == "assistant":
            prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True) or ""
            upto = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False) or ""
            _check_extends(tokenizer, prompt, done, f"the prompt of turn {i}", "the turns before it")
            _check_extends(tokenizer, upto, prompt, f"turn {i} (assistant)", "its prompt")
            if prompt[len(done) :]:
                pieces.append((prompt[len(done) :], False))
            pieces.append((upto[len(prompt) :], True))
            done = upto
    _check_extends(tokenizer, full, done, "the whole conversation", "its last assistant turn")
    if full[len(done) :]:
        pieces.append((full[len(done) :], False))
    return pieces, True


def _check_extends(tokenizer: Tokenizer, longer: str, shorter: str, what: str, of: str) -> None:
    if not longer.startswith(shorter):
        at = next((k for k, (a, b) in enumerate(zip(longer, shorter)) if a != b), min(len(longer), len(shorter)))
        raise TemplateError(
            f"{tokenizer.path}: the chat template renders {what} differently from {of} (they part at character "
            f"{at}: {shorter[at : at + 30]!r} vs {longer[at : at + 30]!r}), so the loss mask cannot be placed; "
            "use a template whose renderings extend each other"
        )


def encode_examples(tokenizer: Tokenizer, examples: Sequence[Messages]) -> list[tuple[list[int], list[int]]]:
    """Tokenize examples in one batch call per kind; each gets ``(ids, loss_mask)`` with one end token."""
    rendered = [render_pieces(tokenizer, ex) for ex in examples]
    templated = [text for pieces, by_template in rendered if by_template for text, _ in pieces]
    plain = [text for pieces, by_template in rendered if not by_template for text, _ in pieces]
    encoded = {
        True: iter(tokenizer.encode_rendered(templated) if templated else []),
        False: iter(tokenizer.encode_batch(plain, start=False) if plain else []),
    }
    bos = list(tokenizer.bos_ids)
    out: list[tuple[list[int], list[int]]] = []
    for pieces, by_template in rendered:
        ids: list[int] = []
        mask: list[int] = []
        answer_start = None
        for _, loss in pieces:
            piece = next(encoded[by_template])
            if loss:
                answer_start = len(ids)
            ids.extend(piece)
            mask.extend([int(loss)] * len(piece))
        if bos and ids[: len(bos)] != bos:
            ids, mask = bos + ids, [0] * len(bos) + mask
            answer_start = None if answer_start is None else answer_start + len(bos)
        end = _template_eos(ids, tokenizer.eos_id, answer_start) if by_template else None
        if end is not None:
            ids, mask = ids[: end + 1], mask[: end + 1]
        else:
            ids.append(tokenizer.eos_id)
            mask.append(int(bool(pieces) and pieces[-1][1]))
        out.append((ids, mask))
    return out


def _template_eos(ids: list[int], eos_id: int, answer_start: int | None) -> int | None:
    """Where the template's own EOS closes the last assistant turn, if it does."""
    if answer_start is None:
        return None
    try:
        return ids.index(eos_id, answer_start)
    except ValueError:
        return None
