"""What the calibration pass hands to observers: every block boundary of the same tokens.

Boundary b is the hidden state entering block b (b = 0 .. n-1) or leaving the last block (b = n),
before the final norm. The first token of every sequence is dropped: it carries the "attention
sink" activations, orders of magnitude larger than the rest, which swamp every statistic.
Observers consume a batch of windows at a time, so what they keep does not grow with the
calibration set.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

SINK_TOKENS = 1


class BoundaryObserver(Protocol):
    def observe(self, states: Sequence[torch.Tensor]) -> None:
        """states[b]: (tokens, hidden) float32 tensor at boundary b for one batch."""


def block_output(output) -> torch.Tensor:
    """The hidden state a decoder block returns (some return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def observe_cached(windows, observers: Sequence[BoundaryObserver], batch_size: int) -> int:
    """Hand the cached dense boundary states of `windows` to the observers, a batch of windows at
    a time (each gets every boundary of the same tokens); return the tokens observed."""
    boundaries = sorted(windows.dense)
    seen = 0
    for start in range(0, len(windows), batch_size):
        flat = [windows.dense[b][start : start + batch_size, SINK_TOKENS:, :].reshape(-1, windows.dense[b].shape[-1]).float()
                for b in boundaries]
        for observer in observers:
            observer.observe(flat)
        seen += flat[0].shape[0]
    return seen


class TokenSample:
    """A fixed-size uniform sample of tokens (same tokens at every boundary), seeded.

    Reservoir sampling keeps memory at `max_tokens` x boundaries x hidden, whatever the
    calibration size: population estimators (Gaussian log-det, Renyi) need raw samples.
    """

    def __init__(self, max_tokens: int, seed: int = 0):
        self.max_tokens = max_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: list[torch.Tensor] | None = None
        self.seen = 0

    def observe(self, states: Sequence[torch.Tensor]) -> None:
        states = [s.detach().cpu() for s in states]
        count = states[0].shape[0]
        if self.samples is None:
            self.samples = [torch.empty(0, s.shape[1]) for s in states]
        room = self.max_tokens - self.samples[0].shape[0]
        take = min(room, count)
        if take > 0:
            self.samples = [torch.cat([kept, s[:take]]) for kept, s in zip(self.samples, states)]
        # Algorithm R for the rest: overall token p replaces a random slot with probability k/(p+1).
        rest = count - take
        if rest > 0:
            positions = torch.arange(self.seen + take, self.seen + count, dtype=torch.float64)
            slots = (torch.rand(rest, generator=self.generator, dtype=torch.float64) * (positions + 1)).long()
            for t in torch.nonzero(slots < self.max_tokens).flatten().tolist():
                for kept, s in zip(self.samples, states):
                    kept[slots[t]] = s[take + t]
        self.seen += count

    def arrays(self) -> list:
        if self.samples is None:
            raise ValueError("no tokens were observed")
        return [s.numpy() for s in self.samples]
