"""Perplexity of a causal LM over token windows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens
    windows: int


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """The standard non-overlapping windows of `seq_len` tokens, from the start of the stream."""
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


@torch.no_grad()
def perplexity(
    model,
    windows: torch.Tensor,
    batch_size: int = 4,
    on_batch: Callable[[], None] | None = None,
) -> Perplexity:
    """Mean token NLL over `windows` (n, seq_len); every token but each window's first is predicted."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1, :].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
        if on_batch is not None:
            on_batch()
    mean = total_nll / total_tokens
    return Perplexity(ppl=math.exp(mean) if mean < 700 else math.inf, nll=mean, tokens=total_tokens, windows=windows.shape[0])
