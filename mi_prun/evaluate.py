"""Quality of a causal LM over token windows: perplexity, and KL / top-1 agreement to a reference.

Windows are the standard non-overlapping ones of `seq_len` tokens from the start of the stream,
or strided ones (each window shifted by `stride`; only the tokens no earlier window scored are
scored, each with up to `seq_len - stride` tokens of left context).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from . import distributed
from .metrics import ppl_from_nll
from .runner import Windows


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

    def share(self) -> "EvalWindows":
        """This rank's share of the windows (all of them in one process); `evaluate` sums over ranks."""
        rows = distributed.share(len(self))
        return EvalWindows(self.ids[rows], self.first_target[rows], self.stride)

    def target_mask(self) -> torch.Tensor:
        """(n, seq_len - 1) True where the target token is scored."""
        positions = torch.arange(self.seq_len - 1)
        return positions[None, :] >= self.first_target[:, None]


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


@torch.no_grad()
def final_states(runner, ids: torch.Tensor, runs: Sequence = (), on_block: Callable[[], None] | None = None,
                 rewritten: dict[str, torch.Tensor] | None = None, linear_attention: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """States leaving the last block for every window: (pruned, dense), the pruned model having
    `runs` removed (compensate.RunCompensation, their maps in place). One dense pass keeps only
    the boundary where the pruned model first differs; the pruned model continues from there.
    `rewritten`: weights the pruned model holds beside its maps (healed; names of the unpruned
    model), in place for the pruned model only: the dense states come from the original weights;
    `linear_attention`: blocks whose attention the pruned model runs as a linear map (its weight
    among `rewritten`)."""
    from .compensate import final_states as pruned_final, first_changed

    n = runner.n_blocks
    start = first_changed(runs, [runner.spec.block_of(name)[0] for name in rewritten or {}], n)
    windows = runner.dense_pass(Windows(ids), keep=lambda b: b in (0, start, n), on_block=on_block)
    dense = windows.dense[n]
    if not rewritten:
        return (pruned_final(runner, windows, runs) if runs else dense), dense
    with runner.rewriting(rewritten, linear_attention):
        return pruned_final(runner, windows, runs, start=start), dense


@torch.no_grad()
def evaluate(runner, final: torch.Tensor, windows: EvalWindows, reference=None,
             on_window: Callable[[], None] | None = None) -> EvalResult:
    """Perplexity from final states (`final_states`) on `windows`; with `reference` = (runner,
    final states) of a reference model, mean KL(reference || model) and top-1 agreement."""
    start = time.perf_counter()
    total_nll = total_kl = 0.0
    agree = tokens = 0
    mask = windows.target_mask()
    ref_rows = reference[0].token_rows(reference[1], windows.ids) if reference is not None else None
    last = -1
    for w, pos, lp, targets in runner.token_rows(final, windows.ids):
        keep = mask[w, pos]
        nll = -lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        total_nll += float(nll[keep].sum())
        tokens += int(keep.sum())
        if ref_rows is not None:
            ref = next(ref_rows)[2]
            kl = (ref.exp() * (ref - lp)).sum(-1)
            total_kl += float(kl[keep].sum())
            agree += int((ref.argmax(-1) == lp.argmax(-1))[keep].sum())
        if on_window is not None and w != last:
            on_window()
            last = w
    # Every rank scored its share of the windows.
    total_nll, total_kl, agree, tokens, count = distributed.all_sum([total_nll, total_kl, agree, tokens, len(windows)])
    mean = total_nll / tokens
    return EvalResult(
        ppl=ppl_from_nll(mean),
        nll=mean,
        tokens=int(tokens),
        windows=int(count),
        seq_len=windows.seq_len,
        stride=windows.stride,
        wall_s=time.perf_counter() - start,
        kl=None if reference is None else total_kl / tokens,
        top1=None if reference is None else agree / tokens,
    )


@torch.no_grad()
def perplexity(runner, windows: torch.Tensor, runs: Sequence = ()) -> Perplexity:
    """Mean token NLL over `windows` (n, seq_len) of the model with `runs` removed (their maps in
    place); every token but each window's first is predicted."""
    final, _ = final_states(runner, windows, runs)
    total_nll, total_tokens = runner.nll_sum(final, windows)
    mean = total_nll / total_tokens
    return Perplexity(ppl=ppl_from_nll(mean), nll=mean, tokens=total_tokens, windows=windows.shape[0])
