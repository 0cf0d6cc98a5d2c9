"""Perplexity on held-out documents, each document alone (no packing, so nothing leaks between them).

Token-level: exp(total NLL / number of predicted tokens) over the first
``seq_len`` tokens of each document. Ranks split the documents and all-reduce
the sums; under ZeRO-3 every rank runs the same number of forwards.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

Forward = Callable[[torch.Tensor], torch.Tensor]  # [1, L] ids → [1, L, V] logits


def perplexity(forward: Forward, docs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], seq_len: int,
               device: torch.device | str = "cpu") -> dict[str, float]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(docs), world))
    rounds = math.ceil(len(docs) / world) if docs else 0
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for k in range(rounds):
            real = k < len(mine)
            i = mine[k] if real else 0  # a padding forward keeps ZeRO-3 collectives in step
            ids = torch.as_tensor(docs[i][:seq_len], dtype=torch.long, device=device).unsqueeze(0)
            if ids.shape[1] < 2:
                ids = torch.cat([ids, ids], 1)
                real = False
            logits = forward(ids)
            target_mask = torch.as_tensor(masks[i][1:seq_len], dtype=torch.bool, device=device)
            targets = ids[0, 1:].masked_fill(~target_mask[: ids.shape[1] - 1], -100)
            nll = F.cross_entropy(logits[0, :-1].float(), targets, ignore_index=-100, reduction="sum")
            if real:
                sums += torch.stack([nll.double(), (targets != -100).sum().double()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    nll, tokens = float(sums[0]), float(sums[1])
    return {"nll": nll, "tokens": tokens, "ppl": math.exp(nll / tokens) if tokens else float("nan")}


def holdout_perplexities(forward: Forward, holdout: dict[str, Any], seq_len: int, max_docs: int,
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """{'ppl/general': ..., 'ppl/domain': ...} for the holdout splits given as datasets."""
    out = {}
    for role, ds in holdout.items():
        n = min(max_docs, len(ds))
        rows = ds.select(range(n))
        out[f"ppl/{role}"] = perplexity(forward, rows["input_ids"], rows["loss_mask"], seq_len, device)["ppl"]
    return out
