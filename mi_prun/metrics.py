"""Reported numbers from summed statistics: torch-free, shared by the engine and the runtimes' checks."""

from __future__ import annotations

import math


def ppl_from_nll(mean_nll: float) -> float:
    """exp(NLL), infinite for a collapsed model instead of an overflow."""
    return math.exp(mean_nll) if mean_nll < 700 else math.inf
