"""Where a run's seconds go: wall time per kind of work, for pruning.json's `profile_s`.

The block runner, the tensor sources and the compensation fits mark their work with
`PROFILE.part(name)`; the pipeline's stopwatch reads the totals before and after each stage, so
every stage is split into the parts below, and what no part claims is the stage's "other"
(MI estimation, selection, bookkeeping). Parts nest exclusively: a part inside another counts
only in the inner one, so the parts of a stage never sum to more than its wall time. On a CUDA
device a part waits for the device's queue before it stops, so asynchronous kernels count where
they were launched.

Block-forwards (one block run over one window) are counted here too: against the least a build
needs (`minimum_block_forwards`), they say how much of the work was repeated.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from enum import Enum
from typing import Iterator, Sequence

import torch


class Part(str, Enum):
    forward = "forward"  # decoder blocks run on states
    head = "head"  # final norm, output head and NLL of the verification passes
    read = "read"  # tensor bytes read from the model's files
    dequantize = "dequantize"
    copy = "copy to device"  # host to device transfers of weights and states
    moments = "ridge moments"  # the compensation fits' streamed moments
    ridge = "ridge solves"  # cross-validated ridge fits and folding the map into the weight


class Profile:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.block_forwards = 0  # blocks x windows run
        self._stack: list[list] = []  # [part, start] of the parts entered, innermost last

    @contextmanager
    def part(self, name: Part | str, device: torch.device | None = None) -> Iterator[None]:
        key = name.value if isinstance(name, Part) else name
        now = time.perf_counter()
        if self._stack:  # the enclosing part stops counting while this one runs
            outer = self._stack[-1]
            self._add(outer[0], now - outer[1])
        frame = [key, now]
        self._stack.append(frame)
        try:
            yield
        finally:
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            self._add(key, now - frame[1])
            self._stack.pop()
            if self._stack:
                self._stack[-1][1] = now

    def _add(self, key: str, seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds

    def snapshot(self) -> tuple[dict[str, float], int]:
        return dict(self.seconds), self.block_forwards

    def since(self, before: tuple[dict[str, float], int]) -> tuple[dict[str, float], int]:
        """Seconds per part, and block-forwards, since `before` (a snapshot)."""
        seconds, forwards = before
        return {k: v - seconds.get(k, 0.0) for k, v in self.seconds.items() if v - seconds.get(k, 0.0) > 0}, self.block_forwards - forwards


PROFILE = Profile()


def stage_profile(parts: dict[str, float], wall: float) -> dict[str, float]:
    """A stage's parts, rounded, with the rest of its wall time as "other"."""
    out = {k: round(v, 3) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
    out["other"] = round(max(0.0, wall - sum(parts.values())), 3)
    return out


def minimum_block_forwards(n_blocks: int, capture_windows: int, proposals: Sequence[Sequence[int]], verify_windows: int,
                           first_changed: Sequence[int] | None = None) -> int:
    """The least block-forwards that capture and verification need: one pass of every block over
    the capture windows, and for each verified proposal the blocks from the first one it changes
    (its first removed block, or the block before it where a map is folded in) over the
    verification windows. Everything before that block is the dense model, cached once."""
    starts = first_changed if first_changed is not None else [min(p) for p in proposals]
    return n_blocks * capture_windows + sum(n_blocks - s for s in starts) * verify_windows
