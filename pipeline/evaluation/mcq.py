"""Multiple-choice accuracy by log-likelihood: the yardstick GeRe reports (MMLU), beside perplexity.

A question file is MMLU's layout, a CSV without header: ``question, choice A,
..., choice D, answer letter`` (any number of choices >= 2), or jsonl with
``question``, ``choices`` (a list) and ``answer`` (a letter or a 0-based
index). Each choice is scored as the continuation ``" " + choice`` of the
prompt ``"Question: ...\\nAnswer:"`` (the two encoded together, cut after the
prompt's tokens): the sum of its tokens' log-probabilities.
``acc`` takes the highest sum, ``acc_norm`` the highest sum per character of
the choice (longer answers are not penalised for their length), as
lm-evaluation-harness does for its ``acc``/``acc_norm``.

Ranks split the (question, choice) pairs and all-reduce the scores; under
ZeRO-3 every rank runs the same number of forwards.
"""

from __future__ import annotations

import csv
import json
import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cpt_core.errors import InputError, UserError
from cpt_core.progress import progress_bar
from data_prep.tokenizer import Tokenizer

from .perplexity import Forward


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def read_questions(path: str | Path) -> list[Question]:
    """A question file (see the module docstring); a malformed row is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(str(path), "no such question file")
    with path.open(encoding="utf-8", newline="") as f:  # newline="": quoted fields keep their line breaks
        if path.suffix == ".jsonl":
            questions = [_from_json(path, n, line) for n, line in enumerate(f, 1) if line.strip()]
        else:
            reader = csv.reader(f)
            questions = [_from_csv(path, reader.line_num, row) for row in reader if row]
    if not questions:
        raise InputError(str(path), "no questions")
    return questions


def _from_csv(path: Path, line: int, row: list[str]) -> Question:
    if len(row) < 4:
        raise InputError(str(path), f"expected question, >= 2 choices, answer letter; got {len(row)} fields", line)
    return _question(path, line, row[0], row[1:-1], row[-1])


def _from_json(path: Path, line: int, raw: str) -> Question:
    try:
        record = json.loads(raw)
        return _question(path, line, record["question"], record["choices"], record["answer"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(str(path), f"expected {{question, choices, answer}}: {e}", line) from None


def _question(path: Path, line: int, question: str, choices: Sequence[str], answer: str | int) -> Question:
    letters = string.ascii_uppercase[: len(choices)]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in letters:
        index = letters.index(answer.strip().upper())
    elif isinstance(answer, int) and 0 <= answer < len(choices):
        index = answer
    else:
        raise InputError(str(path), f"answer {answer!r} is not one of {list(letters)} (or a 0-based index)", line)
    if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise InputError(str(path), "needs at least 2 non-empty choices", line)
    return Question(str(question), tuple(choices), index)


def prompt(question: Question) -> str:
    return f"Question: {question.question.strip()}\nAnswer:"


def split_encodings(tokenizer: Tokenizer, questions: Sequence[Question]) -> tuple[list[list[int]], list[list[int]]]:
    """(context, continuation) ids of every (question, choice): the whole text ``prompt + " " + choice`` encoded
    at once and cut after the prompt's own length, so the model scores the tokens it would see (a tokenizer that
    adds a prefix space to every text would give an encoded-alone " choice" one it never sees)."""
    prompts = [prompt(q) for q in questions]
    texts = [p + " " + c for p, q in zip(prompts, questions) for c in q.choices]
    lengths = [len(ids) for ids in tokenizer.encode_batch(prompts)]
    contexts, continuations = [], []
    at = 0
    for n, question in zip(lengths, questions):
        for ids in tokenizer.encode_batch(texts[at : at + len(question.choices)]):
            if len(ids) <= n:
                raise UserError(f"a choice of the question {question.question[:40]!r} adds no tokens to its prompt")
            contexts.append(ids[:n])
            continuations.append(ids[n:])
        at += len(question.choices)
    return contexts, continuations


def choice_logprobs(
    forward: Forward, tokenizer: Tokenizer, questions: Sequence[Question], device: torch.device | str = "cpu"
) -> list[list[float]]:
    """Log-likelihood of every choice of every question, as a continuation of the question's prompt."""
    pairs = [(q, c) for q, question in enumerate(questions) for c in range(len(question.choices))]
    contexts, continuations = split_encodings(tokenizer, questions)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    scores = torch.zeros(len(pairs), dtype=torch.float64, device=device)
    rounds = math.ceil(len(pairs) / world)
    bar = progress_bar(desc="mcq", unit="choice", total=rounds, quiet=rank != 0)
    with torch.no_grad():
        for k in range(rounds):
            bar.update(1)
            i = k * world + rank
            real = i < len(pairs)
            q, _ = pairs[i] if real else pairs[0]  # a padding forward keeps ZeRO-3 collectives in step
            context, continuation = contexts[i if real else 0], continuations[i if real else 0]
            ids = torch.tensor([context + continuation], dtype=torch.long, device=device)
            logprobs = F.log_softmax(forward(ids)[0, len(context) - 1 : -1].float(), dim=-1)
            target = torch.tensor(continuation, device=device)
            if real:
                scores[i] = logprobs.gather(1, target[:, None]).sum().double()
    bar.close()
    if dist.is_initialized():
        dist.all_reduce(scores)  # each pair was scored on exactly one rank
    flat = scores.tolist()
    out, at = [], 0
    for question in questions:
        out.append(flat[at : at + len(question.choices)])
        at += len(question.choices)
    return out


def mcq_accuracy(
    forward: Forward, tokenizer: Tokenizer, questions: Sequence[Question], device: torch.device | str = "cpu"
) -> dict[str, float]:
    """{'acc', 'acc_norm', 'n'} over ``questions``."""
    scores = choice_logprobs(forward, tokenizer, questions, device)
    hits = norm_hits = 0
    for question, s in zip(questions, scores):
        hits += max(range(len(s)), key=s.__getitem__) == question.answer
        per_char = [v / len(" " + c) for v, c in zip(s, question.choices)]  # the continuation's characters
        norm_hits += max(range(len(s)), key=per_char.__getitem__) == question.answer
    return {"acc": hits / len(questions), "acc_norm": norm_hits / len(questions), "n": float(len(questions))}
