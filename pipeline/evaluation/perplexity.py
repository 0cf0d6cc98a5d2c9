"""Perplexity on held-out documents, each document alone (no packing, so nothing leaks between them).

Token-level: exp(total NLL / number of predicted tokens). ``pipeline.eval``
(the forgetting measurement) scores whole documents: a document longer than
``seq_len`` is cut into windows of ``seq_len`` tokens that overlap by one
token, so every token but the document's first is predicted exactly once;
context restarts at each window (the model never sees more than the seq_len
it trained on). The trainer's periodic eval scores the same way, so its curve
ends at the report's figure; ``whole_documents=False`` scores each document's
first window only (a cheaper trend line, for benches). Ranks split the
windows, batch them up to ``TOKENS_PER_FORWARD`` a forward and all-reduce the
sums; under ZeRO-3 every rank runs the same number of forwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cpt_core.progress import progress_bar

Forward = Callable[[torch.Tensor], torch.Tensor]  # [B, L] ids → [B, L, V] logits

# Windows go through the model together, up to this many tokens a forward: under ZeRO-3 every forward gathers
# every layer, so short windows one at a time spend the eval in gathers. A forward's logits are then never
# larger than those of one 4096-token window, what a window a forward held at that seq_len.
TOKENS_PER_FORWARD = 4096


def logits_of(model: Callable[..., Any]) -> Forward:
    """The :data:`Forward` of a causal LM or a DeepSpeed engine around one (no KV cache)."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits


def windows(doc_lengths: Sequence[int], seq_len: int, whole_documents: bool = True) -> list[tuple[int, int]]:
    """(document, start) of every window; consecutive windows share one token (the next one's context)."""
    stride = seq_len - 1
    return [
        (d, start)
        for d, n in enumerate(doc_lengths)
        for start in (range(0, max(n - 1, 1), stride) if whole_documents else (0,))
    ]


def document_losses(
    forward: Forward,
    docs: Sequence[Sequence[int]],
    masks: Sequence[Sequence[int]],
    seq_len: int,
    device: torch.device | str = "cpu",
    whole_documents: bool = True,
) -> torch.Tensor:
    """[documents, 2] float64 on the CPU: each document's summed NLL and its number of predicted tokens, over
    every rank's windows. Per document, so a caller can say how much a figure depends on which documents were
    scored (the forgetting budget's standard error); one all-reduce of 16 bytes a document."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    spans = windows([len(d) for d in docs], seq_len, whole_documents)
    mine = spans[rank::world]
    per_forward = max(1, TOKENS_PER_FORWARD // seq_len)
    rounds = math.ceil(math.ceil(len(spans) / world) / per_forward) if spans else 0
    sums = torch.zeros(len(docs), 2, dtype=torch.float64, device=device)
    bar = progress_bar(desc="eval", unit="window", total=len(mine), quiet=rank != 0)
    with torch.no_grad():
        for k in range(rounds):
            batch = mine[k * per_forward : (k + 1) * per_forward]
            bar.update(len(batch))
            ids, targets = window_batch(docs, masks, batch or spans[:1], seq_len)  # [] → a padding forward
            ids, targets = ids.to(device), targets.to(device)
            logits = forward(ids)
            for row, (d, _) in enumerate(batch):  # row by row: one row's fp32 logits alive at a time
                nll = F.cross_entropy(logits[row, :-1].float(), targets[row], ignore_index=-100, reduction="sum")
                # indexed by Python ints: no host sync on an accelerator
                sums[d] += torch.stack([nll.double(), (targets[row] != -100).sum().double()])
            del logits  # else the next forward's logits are made while these are still held
    bar.close()
    if dist.is_initialized():
        dist.all_reduce(sums)  # float64 is an NCCL type; the sum is the same on every rank
    return sums.cpu()


def window_batch(
    docs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], batch: Sequence[tuple[int, int]], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows' token ids [rows, width] and next-token targets [rows, width - 1] (-100 where nothing is
    scored). Shorter windows are padded on the right, which a causal model's real positions never see; a
    one-token window gets a second position so that the forward has a target shape."""
    width = max(2, *(min(seq_len, len(docs[d]) - start) for d, start in batch))
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    targets = torch.full((len(batch), width - 1), -100, dtype=torch.long)
    for row, (d, start) in enumerate(batch):
        window = torch.as_tensor(docs[d][start : start + seq_len], dtype=torch.long)
        scored = torch.as_tensor(masks[d][start + 1 : start + len(window)], dtype=torch.bool)
        ids[row, : len(window)] = window
        targets[row, : len(window) - 1] = window[1:].masked_fill(~scored, -100)
    return ids, targets


def perplexity_of(losses: torch.Tensor) -> float:
    """Token-level perplexity of :func:`document_losses`' rows together."""
    nll, tokens = losses.sum(0).tolist()
    return math.exp(nll / tokens) if tokens else float("nan")


def perplexity_change(base: torch.Tensor, now: torch.Tensor) -> tuple[float, float]:
    """(relative change of the token-level perplexity, its standard error over documents) from each document's
    (NLL, tokens) before and now (:func:`document_losses` of the same documents).

    The change is exp(Σ Δnll / Σ tokens) − 1 with Δnll a document's NLL change: a ratio estimator, whose
    standard error over a sample of n documents is √(n/(n−1) · Σ (Δnll_i − r · tokens_i)²) / Σ tokens at
    r = Σ Δnll / Σ tokens, times exp(r) for the change (the delta method); nan for one document. It says how
    far the figure would move on other documents like these, not how it varies between training runs."""
    delta, tokens = now[:, 0] - base[:, 0], base[:, 1]
    total = float(tokens.sum())
    if not total:  # no document predicts a token (an empty holdout): no figure, as perplexity_of
        return math.nan, math.nan
    rate = float(delta.sum()) / total
    n = len(tokens)
    if n < 2:
        return math.expm1(rate), math.nan
    spread = float(((delta - rate * tokens) ** 2).sum()) * n / (n - 1)
    return math.expm1(rate), math.exp(rate) * math.sqrt(spread) / total


def holdout_losses(
    forward: Forward,
    holdout: dict[str, Any],
    seq_len: int,
    max_docs: int,
    device: torch.device | str = "cpu",
    whole_documents: bool = True,
) -> dict[str, torch.Tensor]:
    """{role: :func:`document_losses` of its first ``max_docs`` documents} for the holdout splits given as
    datasets."""
    out = {}
    for role, ds in holdout.items():
        rows = ds.select(range(min(max_docs, len(ds))))
        out[role] = document_losses(forward, rows["input_ids"], rows["loss_mask"], seq_len, device, whole_documents)
    return out


def perplexities(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """{'ppl/general': ..., 'ppl/domain': ...} from :func:`holdout_losses`."""
    return {f"ppl/{role}": perplexity_of(docs) for role, docs in losses.items()}
