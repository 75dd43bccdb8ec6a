import itertools
import random

import numpy as np
import pytest

from mi_prun import select


def random_run_cost(n, seed):
    rng = random.Random(seed)
    block = [rng.uniform(0.05, 1.0) for _ in range(n)]
    table = {}
    for a in range(n):
        for b in range(a, n):
            # at least the DPI bound, plus something: longer runs lose more
            table[(a, b)] = max(block[a : b + 1]) + rng.uniform(0.0, 0.3) * (b - a)
    return block, lambda a, b: table[(a, b)]


def brute_force(n, k, cost):
    return min(itertools.combinations(range(n), k), key=lambda c: select.selection_cost(c, cost))


def test_runs_of():
    assert select.runs_of([5, 1, 2, 3, 7, 8]) == [(1, 3), (5, 5), (7, 8)]
    assert select.runs_of([]) == []


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_exact_select_is_the_optimum(seed, k):
    n = 9
    _, cost = random_run_cost(n, seed)
    best = brute_force(n, k, cost)
    got = select.exact_select(n, k, cost)
    assert len(got) == k
    assert select.selection_cost(got, cost) == pytest.approx(select.selection_cost(best, cost))


@pytest.mark.parametrize("seed", range(6))
def test_fast_block_select_is_feasible_and_close_to_exact(seed):
    n, k = 16, 5
    block, cost = random_run_cost(n, seed)
    got, trace = select.fast_block_select(n, k, block, cost)
    assert len(got) == k and len(set(got)) == k and all(0 <= i < n for i in got)
    exact = select.selection_cost(select.exact_select(n, k, cost), cost)
    assert select.selection_cost(got, cost) <= exact * 1.25
    assert trace.iterations >= 1
    # only candidates and the merged runs they form were measured, not all runs
    assert trace.measured_runs < n * (n - 1) // 2


def test_fast_block_select_prefers_a_cheap_run_over_expensive_singles():
    n = 10
    block = [0.5] * n
    block[3] = block[4] = block[5] = 0.1

    def cost(a, b):
        if a == b:
            return block[a]
        return 0.12 if (a, b) == (3, 5) else max(block[a : b + 1]) + 0.5

    got, _ = select.fast_block_select(n, 3, block, cost)
    assert got == [3, 4, 5]
    assert select.exact_select(n, 3, cost) == [3, 4, 5]


def test_dpi_bound_is_max_block_cost():
    assert select.dpi_bound([0.1, 0.7, 0.3], 0, 2) == 0.7


def test_baselines():
    assert select.lowest_scores([0.5, 0.1, 0.9, 0.2], 2) == [1, 3]
    assert select.best_contiguous_run(6, 2, lambda a, b: abs(a - 3)) == [3, 4]
    a = select.random_select(30, 6, seed=1)
    assert a == select.random_select(30, 6, seed=1) and len(set(a)) == 6
    assert a != select.random_select(30, 6, seed=2)


def test_evaluation_driven_baselines():
    harm = [5, 1, 4, 2, 3, 9]

    def evaluate(removed):
        # interaction: removing 1 and 3 together is bad
        return sum(harm[i] for i in removed) + (50 if {1, 3} <= set(removed) else 0)

    assert select.greedy_eval_select(6, 2, evaluate) == [1, 4]
    removed, scores = select.one_shot_eval_select(6, 2, evaluate)
    assert removed == [1, 3] and scores == harm


@pytest.mark.parametrize("k", [0, 8, 9])
def test_budget_is_checked(k):
    with pytest.raises(ValueError):
        select.exact_select(8, k, lambda a, b: 1.0)


def test_swap_neighbours_are_the_cheapest_single_swaps():
    _, cost = random_run_cost(8, 5)
    removed = [1, 4, 5]
    got = select.swap_neighbours(removed, 8, cost, 4)
    every = {tuple(sorted(set(removed) - {o} | {i})) for o in removed for i in range(8) if i not in removed}
    assert len(every) == 3 * 5 and all(len(set(s) ^ set(removed)) == 2 for s in got)
    ranked = sorted(every, key=lambda s: (select.selection_cost(s, cost), s))
    assert [tuple(s) for s in got] == ranked[:4]
    assert select.swap_neighbours(removed, 8, cost, 100) == [list(s) for s in ranked]


def test_lower_p_is_a_paired_one_sided_test():
    """Verification's test: a lower mean NLL is not enough when the windows disagree; a small but
    consistent drop is; a window's own difficulty cancels in the pairing."""
    from mi_prun.verify import lower_p

    incumbent = np.linspace(2.0, 4.0, 16)  # windows of very different difficulty
    assert lower_p(incumbent, incumbent) == 1.0
    # one window much better, fifteen slightly worse: the mean is lower (by 0.078), the test says no
    noisy = incumbent + np.array([-2.0] + [0.05] * 15)
    assert noisy.mean() < incumbent.mean() and lower_p(noisy, incumbent) > 0.1
    # every window a little better, by different amounts: clearly lower, despite the spread across windows
    steady = incumbent - 0.02 - 0.01 * np.cos(np.arange(16))
    assert lower_p(steady, incumbent) < 1e-6
    assert lower_p(incumbent, steady) > 1 - 1e-6
    # differences -1, -2, -3: t = -2 / (1 / sqrt 3) = -3.464 on 2 degrees of freedom, one-sided p = 0.0371
    assert lower_p(np.array([0.0, 0.0, 0.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.0371, abs=1e-4)
    # a constant difference has no spread to test: decided by its sign
    exact = np.arange(16) * 0.25  # binary fractions: the difference is exactly constant
    assert lower_p(exact - 0.5, exact) == 0.0 and lower_p(exact + 0.5, exact) == 1.0
