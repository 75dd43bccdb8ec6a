"""Data-parallel runs on torch.distributed: `torchrun --nproc-per-node K -m mi_prun <command> ...`.

Each rank takes a contiguous share of the windows (calibration, compensation and evaluation),
runs the blocks over them, and every statistic the decisions use is summed over the ranks
before anything is decided: the token statistics of the capture pass, the ridge moments of every
compensation fit, the NLL sums of every verification and evaluation. All ranks then take the same
decisions from the same numbers; rank 0 alone writes. Shares are contiguous and in rank order, so
rows gathered from the ranks (the attention-sink rows of a fit) come back in the order one
process would have produced them, and the answer does not depend on the number of ranks.

Launched without torchrun (no WORLD_SIZE in the environment, or 1), every function here is the
identity of one process. Statistics travel as float64 on the CPU (gloo); CUDA ranks use nccl for
nothing else, so the same code runs on both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported where a collective runs: the CLI starts (and rejects bad input) without it.

# Seconds a rank waits in a collective before it gives up (a rank that stopped, a hung peer).
TIMEOUT_ENV = "MI_PRUN_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800


class RankFailure(Exception):
    """A collective failed: another rank stopped, or the ranks lost contact."""


@dataclass
class Traffic:
    """What this rank sent into collectives, for the record (pruning.json) and the scaling report."""

    reductions: int = 0
    bytes: int = 0


TRAFFIC = Traffic()


def world() -> int:
    """Ranks in this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this rank writes outputs and talks to the user."""
    return rank() == 0


def active() -> bool:
    return world() > 1


def timeout_s() -> int:
    return int(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def backend() -> str:
    import torch

    # Statistics are CPU float64 tensors: gloo carries them on CUDA machines too.
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def start() -> None:
    """Join the process group when launched by torchrun with more than one rank (idempotent)."""
    if not active():
        return
    import torch.distributed

    if torch.distributed.is_initialized():
        return
    try:
        torch.distributed.init_process_group(backend(), timeout=timedelta(seconds=timeout_s()))
    except Exception as err:  # a rendezvous that never completes, a port in use
        raise RankFailure(f"could not join the other {world() - 1} ranks ({_first_line(err)})") from err


def stop() -> None:
    if not active():
        return
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def describe() -> str:
    return f"rank {rank()} of {world()}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _collective(what: str, call) -> None:
    try:
        call()
    except RankFailure:
        raise
    except Exception as err:  # gloo: peer closed the connection, or the timeout passed
        raise RankFailure(f"lost contact with the other ranks while {what} ({_first_line(err)}); "
                          f"another rank stopped, or none answered within {timeout_s()} s ({TIMEOUT_ENV})") from err


# -- shares of the windows ---------------------------------------------------------------------


def share(count: int) -> slice:
    """This rank's contiguous share of `count` windows (sizes differ by at most one)."""
    k, r = world(), rank()
    return slice(r * count // k, (r + 1) * count // k)


# -- reductions ----------------------------------------------------------------------------------


def all_sum(values: "np.ndarray | torch.Tensor | float | int | Sequence[float]"):
    """`values` summed over every rank (float64), in the type it came in."""
    if not active():
        return values
    import torch

    as_tensor = torch.as_tensor(np.asarray(values, dtype=np.float64) if not isinstance(values, torch.Tensor) else values)
    buffer = as_tensor.detach().to("cpu", torch.float64).clone()
    _collective("summing statistics", lambda: torch.distributed.all_reduce(buffer))
    TRAFFIC.reductions += 1
    TRAFFIC.bytes += buffer.numel() * buffer.element_size()
    if isinstance(values, torch.Tensor):
        return buffer.to(values.dtype)
    if isinstance(values, np.ndarray):
        return buffer.numpy()
    if isinstance(values, (int, np.integer)):
        return int(round(float(buffer)))
    if isinstance(values, (float, np.floating)):
        return float(buffer)
    return buffer.tolist()


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank: a choice that decides whether collectives follow (a memo
    kept or not) must be the same everywhere, or the ranks would wait on different calls."""
    if not active():
        return flag
    return all_sum(1.0 if flag else 0.0) == world()


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every rank's rows stacked in rank order (which is window order: shares are contiguous)."""
    if not active():
        return rows
    import torch.distributed

    parts: list = [None] * world()
    _collective("gathering rows", lambda: torch.distributed.all_gather_object(parts, rows))
    TRAFFIC.reductions += 1
    TRAFFIC.bytes += rows.nbytes
    return np.vstack(parts)


def from_main(value):
    """Rank 0's `value` on every rank (rank 0 computed it, the others pass anything)."""
    if not active():
        return value
    import torch.distributed

    box = [value]
    _collective("receiving rank 0's result", lambda: torch.distributed.broadcast_object_list(box, src=0))
    TRAFFIC.reductions += 1
    return box[0]
