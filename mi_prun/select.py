"""Block selection: scores in, removed block indices out. No model, no torch.

A *run* (start, end) is a contiguous, inclusive range of blocks. Removing a set of blocks removes
its maximal runs; a run i..j maps h_{i-1} straight to h_j, so its cost is measured on that pair.
The MI-PRUN objective is additive over maximal runs: the sum of each run's lost fraction
exp(-2 I(h_{i-1}; h_j)), the share of the state a Gaussian channel of that MI would lose.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

Run = tuple[int, int]
RunCost = Callable[[int, int], float]


def runs_of(indices: Sequence[int]) -> list[Run]:
    """Maximal contiguous runs of a set of block indices, in order."""
    runs: list[Run] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def selection_cost(removed: Sequence[int], run_cost: RunCost) -> float:
    return sum(run_cost(a, b) for a, b in runs_of(removed))


def check_budget(n_blocks: int, n_remove: int) -> None:
    if not 1 <= n_remove < n_blocks:
        raise ValueError(f"can remove between 1 and {n_blocks - 1} of {n_blocks} blocks, not {n_remove}")


# --- the MI-PRUN objective ------------------------------------------------------------------


def exact_select(n_blocks: int, n_remove: int, run_cost: RunCost) -> list[int]:
    """Global optimum of the additive run objective, by dynamic programming over positions.

    best[p][k]: least cost over blocks 0..p-1 with k removed, block p-1 kept (or p == 0).
    From there, either keep block p, or remove a run p..q and keep q+1. O(n^2 * N) run costs.
    """
    check_budget(n_blocks, n_remove)
    inf = math.inf
    best = [[inf] * (n_remove + 1) for _ in range(n_blocks + 2)]
    back: dict[tuple[int, int], tuple[int, int, Run | None]] = {}
    best[0][0] = 0.0
    final = [inf] * (n_remove + 1)
    final_back: dict[int, tuple[int, int, Run | None]] = {}
    for p in range(n_blocks + 1):
        for k in range(n_remove + 1):
            here = best[p][k]
            if here == inf:
                continue
            if p == n_blocks:
                if here < final[k]:
                    final[k], final_back[k] = here, (p, k, None)
                continue
            if here < best[p + 1][k]:  # keep block p
                best[p + 1][k], back[(p + 1, k)] = here, (p, k, None)
            for q in range(p, min(n_blocks, p + n_remove - k)):
                length = q - p + 1
                cost = here + run_cost(p, q)
                if q == n_blocks - 1:
                    if cost < final[k + length]:
                        final[k + length], final_back[k + length] = cost, (p, k, (p, q))
                elif cost < best[q + 2][k + length]:  # run p..q removed, block q+1 kept
                    best[q + 2][k + length], back[(q + 2, k + length)] = cost, (p, k, (p, q))
    if final[n_remove] == inf:
        raise ValueError("no feasible selection")
    removed: list[int] = []
    p, k, run = final_back[n_remove]
    while True:
        if run is not None:
            removed.extend(range(run[0], run[1] + 1))
        if (p, k) == (0, 0):
            break
        p, k, run = back[(p, k)]
    return sorted(removed)


def length_penalized(run_cost: RunCost, power: float) -> RunCost:
    """cost(run) * len(run)^power: power 0 is the pure channel objective; power 1 charges a run
    as if each of its blocks lost the run's share, which stops one long cheap-looking run from
    winning (the run's lost fraction grows slower with length than real damage does)."""
    if power == 0:
        return run_cost
    return lambda a, b: run_cost(a, b) * (b - a + 1) ** power


def additive_over_blocks(block_cost: Sequence[float]) -> RunCost:
    """A run costs the sum of its blocks' single costs: no interaction inside runs (one-shot)."""
    return lambda a, b: float(sum(block_cost[a : b + 1]))


def dpi_bound(block_cost: Sequence[float], start: int, end: int) -> float:
    """Lower bound on a run's cost from its blocks' costs.

    The chain h_{i-1} -> ... -> h_j is Markov, so by the Data Processing Inequality
    I(h_{i-1}; h_j) <= min_k I(h_{k-1}; h_k); the lost fraction exp(-2 I) is decreasing in I,
    hence cost(run) >= max_k cost(block k).
    """
    return max(block_cost[start : end + 1])


@dataclass
class FastSelectTrace:
    candidates: list[Run] = field(default_factory=list)
    measured_runs: int = 0
    iterations: int = 0
    history: list[list[int]] = field(default_factory=list)


def ranked_runs(block_cost: Sequence[float], sizes: Sequence[int], longest: int) -> list[Run]:
    """Runs of two or more units of total size at most `longest`, by DPI lower bound per unit of size."""
    n = len(sizes)
    runs = [(a, b) for a in range(n) for b in range(a + 1, n) if sum(sizes[a : b + 1]) <= longest]
    return sorted(runs, key=lambda r: dpi_bound(block_cost, *r) / sum(sizes[r[0] : r[1] + 1]))


def fast_block_select(
    n_blocks: int,
    n_remove: int,
    block_cost: Sequence[float],
    run_cost: RunCost,
    top_k: int | None = None,
    sizes: Sequence[int] | None = None,
) -> tuple[list[int], FastSelectTrace]:
    """Fast-Block-Select: DPI-guided candidate runs, greedy fill, then swap until stable.

    1. Rank every run of length <= N by its DPI lower bound per removed block; keep the best
       `top_k` (default 3N) plus all single blocks as candidates. Only candidates (and the merged
       runs they form) ever get their real run cost measured.
    2. Greedy: add the candidate with the smallest measured cost increase per removed block
       that fits the remaining budget, until N blocks are removed.
    3. Iterate: drop one run of the selection and refill greedily; keep the change when the
       total cost falls. Stop when a full pass changes nothing.

    With `sizes` (units of unequal size: sublayers in bytes), N is a size to reach: lengths,
    gains and the budget are counted in size, and the last unit added may pass the budget by
    less than the largest unit (one of each size always fits what is left).
    """
    sizes = [1] * n_blocks if sizes is None else list(sizes)
    check_budget(sum(sizes), n_remove)
    slack = max(sizes) - 1
    trace = FastSelectTrace()
    cache: dict[Run, float] = {}

    def measured(a: int, b: int) -> float:
        if (a, b) not in cache:
            cache[(a, b)] = block_cost[a] if a == b else run_cost(a, b)
            trace.measured_runs += a != b
        return cache[(a, b)]

    def cost(removed: set[int]) -> float:
        return selection_cost(sorted(removed), measured)

    def size(units) -> int:
        return sum(sizes[i] for i in units)

    runs = ranked_runs(block_cost, sizes, n_remove + slack)
    top_k = 3 * math.ceil(n_remove * n_blocks / sum(sizes)) if top_k is None else top_k
    trace.candidates = [(i, i) for i in range(n_blocks)] + runs[:top_k]

    def fill(removed: set[int]) -> set[int]:
        removed = set(removed)
        while size(removed) < n_remove:
            base = cost(removed)
            best, best_gain = None, math.inf
            for a, b in trace.candidates:
                block_set = set(range(a, b + 1))
                if block_set & removed or size(removed) + size(block_set) > n_remove + slack:
                    continue
                gain = (cost(removed | block_set) - base) / size(block_set)
                if gain < best_gain:
                    best, best_gain = block_set, gain
            removed |= best  # singles always fit, so best is never None
        return removed

    selection = fill(set())
    trace.history.append(sorted(selection))
    changed = True
    while changed:
        changed = False
        trace.iterations += 1
        for a, b in runs_of(sorted(selection)):
            trial = fill(selection - set(range(a, b + 1)))
            if cost(trial) < cost(selection) - 1e-12:
                selection, changed = trial, True
                trace.history.append(sorted(selection))
                break
    return sorted(selection), trace


def swap_neighbours(removed: Sequence[int], n_blocks: int, run_cost: RunCost, limit: int) -> list[list[int]]:
    """The `limit` single-block swaps of `removed` (one removed block kept, one kept block removed)
    with the lowest objective cost, cheapest first (ties by the blocks, so the order is fixed)."""
    chosen = set(removed)
    swaps = {tuple(sorted(chosen - {out} | {inn})) for out in chosen for inn in range(n_blocks) if inn not in chosen}
    return [list(s) for s in sorted(swaps, key=lambda s: (selection_cost(s, run_cost), s))[:limit]]


# --- baselines ------------------------------------------------------------------------------


def lowest_scores(scores: Sequence[float], n_remove: int) -> list[int]:
    """The n blocks with the smallest damage scores (ShortGPT: block influence 1 - cos)."""
    check_budget(len(scores), n_remove)
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:n_remove])


def lowest_until(scores: Sequence[float], sizes: Sequence[int], budget: int) -> list[int]:
    """ShortGPT at a size budget: units in order of their damage score until `budget` is reached."""
    check_budget(sum(sizes), budget)
    chosen, total = [], 0
    for i in sorted(range(len(scores)), key=lambda i: (scores[i], i)):
        if total >= budget:
            break
        chosen.append(i)
        total += sizes[i]
    return sorted(chosen)


def contiguous_until(sizes: Sequence[int], budget: int, run_distance: RunCost) -> list[int]:
    """The angular baseline at a size budget: of the shortest runs from each start that reach
    `budget`, the one whose endpoints are closest."""
    check_budget(sum(sizes), budget)
    runs = []
    for a in range(len(sizes)):
        total = 0
        for b in range(a, len(sizes)):
            total += sizes[b]
            if total >= budget:
                runs.append((a, b))
                break
    a, b = min(runs, key=lambda r: run_distance(*r))
    return list(range(a, b + 1))


def best_contiguous_run(n_blocks: int, n_remove: int, run_distance: RunCost) -> list[int]:
    """The run of exactly n blocks whose endpoints are closest (angular baseline, Gromov et al.)."""
    check_budget(n_blocks, n_remove)
    start = min(range(n_blocks - n_remove + 1), key=lambda a: run_distance(a, a + n_remove - 1))
    return list(range(start, start + n_remove))


Evaluator = Callable[[Sequence[int]], float]


def greedy_eval_order(n_blocks: int, n_remove: int, evaluate: Evaluator) -> list[int]:
    """SLEB: repeatedly remove the block whose removal (given those already removed) hurts least.

    Returns blocks in the order removed; the first k of them are SLEB's choice for k blocks.
    """
    check_budget(n_blocks, n_remove)
    removed: list[int] = []
    for _ in range(n_remove):
        rest = [i for i in range(n_blocks) if i not in removed]
        removed.append(min(rest, key=lambda i: evaluate(sorted(removed + [i]))))
    return removed


def greedy_eval_until(sizes: Sequence[int], budget: int, evaluate: Evaluator, on_step: Callable[[], None] | None = None) -> list[int]:
    """SLEB at a size budget (BlockPruner's search over sublayers): repeatedly remove the unit
    whose removal, given those already removed, hurts least, until `budget` is reached."""
    check_budget(sum(sizes), budget)
    removed: list[int] = []
    while sum(sizes[u] for u in removed) < budget:
        rest = [u for u in range(len(sizes)) if u not in removed]
        removed.append(min(rest, key=lambda u: evaluate(sorted(removed + [u]))))
        if on_step is not None:
            on_step()
    return sorted(removed)


def greedy_eval_select(n_blocks: int, n_remove: int, evaluate: Evaluator) -> list[int]:
    return sorted(greedy_eval_order(n_blocks, n_remove, evaluate))


def one_shot_eval_select(n_blocks: int, n_remove: int, evaluate: Evaluator) -> tuple[list[int], list[float]]:
    """Shortened LLaMA (PPL criterion): score each block alone, remove the n least harmful."""
    scores = [evaluate([i]) for i in range(n_blocks)]
    return lowest_scores(scores, n_remove), scores


def random_select(n_blocks: int, n_remove: int, seed: int) -> list[int]:
    check_budget(n_blocks, n_remove)
    return sorted(random.Random(seed).sample(range(n_blocks), n_remove))
