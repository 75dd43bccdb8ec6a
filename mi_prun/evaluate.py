"""Quality of a causal LM over token windows: perplexity, and KL / top-1 agreement to a reference.

Windows are the standard non-overlapping ones of `seq_len` tokens from the start of the stream,
or strided ones (each window shifted by `stride`; only the tokens no earlier window scored are
scored, each with up to `seq_len - stride` tokens of left context).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .metrics import ppl_from_nll


@dataclass(frozen=True)
class EvalWindows:
    ids: torch.Tensor  # (n, seq_len)
    first_target: torch.Tensor  # (n,) index into the n x (seq_len - 1) targets of the first scored one
    stride: int

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def target_mask(self) -> torch.Tensor:
        """(n, seq_len - 1) True where the target token is scored."""
        positions = torch.arange(self.seq_len - 1)
        return positions[None, :] >= self.first_target[:, None]

    def batches(self, batch_size: int):
        mask = self.target_mask()
        for start in range(0, len(self), batch_size):
            yield self.ids[start : start + batch_size], mask[start : start + batch_size]


def eval_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """The standard non-overlapping windows of `seq_len` tokens, from the start of the stream."""
    count = ids.numel() // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: count * seq_len].view(count, seq_len)


def strided_windows(ids: torch.Tensor, seq_len: int, stride: int | None = None, max_windows: int | None = None) -> EvalWindows:
    """Windows of `seq_len` starting every `stride` tokens (default: `seq_len`, no overlap).

    The first window scores all its targets; each later one only its last `stride`, so every
    token from the second on is scored exactly once (the tail shorter than a stride is dropped).
    """
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must lie in 1..{seq_len}, got {stride}")
    count = (ids.numel() - seq_len) // stride + 1 if ids.numel() >= seq_len else 0
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = torch.stack([ids[k * stride : k * stride + seq_len] for k in range(count)])
    first = torch.full((count,), seq_len - 1 - stride, dtype=torch.long).clamp_(min=0)
    first[0] = 0
    return EvalWindows(windows, first, stride)


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens
    windows: int


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    nll: float  # mean NLL per scored token, nats
    tokens: int  # scored tokens
    windows: int
    seq_len: int
    stride: int
    wall_s: float
    kl: float | None = None  # mean KL(reference || model) per scored token, nats
    top1: float | None = None  # fraction of scored positions where both models' argmax agree

    def to_dict(self) -> dict:
        return asdict(self)


def log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """(b, seq_len - 1, vocab) float32 log-probabilities of each next token."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1, :]
    return F.log_softmax(logits.float(), dim=-1).cpu()


class Reference:
    """Log-probs of a reference model, batch by batch; `keep=True` stores them so the reference
    runs once (needed when the evaluated model is the same object with blocks removed)."""

    def __init__(self, model, keep: bool = False) -> None:
        self.model, self.keep = model, keep
        self._stored: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, index: int, batch: torch.Tensor) -> torch.Tensor:
        if index in self._stored:
            return self._stored[index]
        out = log_probs(self.model, batch)
        if self.keep:
            self._stored[index] = out
        return out

    def fill(self, windows: EvalWindows, batch_size: int) -> None:
        """Compute and keep every batch now, while the model is still the reference."""
        self.keep = True
        for index, (batch, _) in enumerate(windows.batches(batch_size)):
            self(index, batch)


@torch.no_grad()
def evaluate(
    model,
    windows: EvalWindows,
    reference: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 4,
    on_batch: Callable[[], None] | None = None,
) -> EvalResult:
    """Perplexity of `model` on `windows`; with a reference, mean KL(reference || model) and top-1 agreement.

    `model` may be a `Reference`: its (kept) log-probs are scored, so a dense pass fills the reference."""
    start = time.perf_counter()
    total_nll = total_kl = 0.0
    agree = tokens = 0
    for index, (batch, mask) in enumerate(windows.batches(batch_size)):
        lp = model(index, batch) if isinstance(model, Reference) else log_probs(model, batch)
        targets = batch[:, 1:]
        nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total_nll += float(nll[mask].sum())
        tokens += int(mask.sum())
        if reference is not None:
            ref = reference(index, batch)
            kl = (ref.exp() * (ref - lp)).sum(-1)
            total_kl += float(kl[mask].sum())
            agree += int((ref.argmax(-1) == lp.argmax(-1))[mask].sum())
        if on_batch is not None:
            on_batch()
    mean = total_nll / tokens
    return EvalResult(
        ppl=ppl_from_nll(mean),
        nll=mean,
        tokens=tokens,
        windows=len(windows),
        seq_len=windows.seq_len,
        stride=windows.stride,
        wall_s=time.perf_counter() - start,
        kl=None if reference is None else total_kl / tokens,
        top1=None if reference is None else agree / tokens,
    )


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
    return Perplexity(ppl=ppl_from_nll(mean), nll=mean, tokens=total_tokens, windows=windows.shape[0])
