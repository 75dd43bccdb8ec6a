"""Which blocks each method removes: scores (and a verifier for the methods that evaluate) in,
original block indices out. MI-PRUN proposes the optimum of several forms of its objective and
keeps the first unless the verifier scores another lower beyond the windows' noise."""

from __future__ import annotations

import time

from . import select
from .manifest import Candidate, SelectionInfo
from .plan import Method, Objective, Plan
from .progress import QUIET, Reporter
from .scoring import BoundaryMI, Scores
from .verify import RemovalScorer

# Rounds of single-block swaps tried around the best proposal (each verifies `Plan.swaps` removals).
SWAP_ROUNDS = 3
# A proposal displaces the one it challenges only when its calibration NLL is lower by a paired
# one-sided t-test over windows at this level (the usual two-sided 5% test): on 16 windows the
# proposals often differ by less than the windows' noise, and following the noise made the choice
# flip with the calibration text (reports/stability.md).
LOWER_P = 0.025


def objective_cost(objective: Objective, scores: Scores) -> select.RunCost:
    bmi = scores.boundary_mi
    if objective is Objective.compensated:
        return scores.recovery.run_cost
    if objective is Objective.per_block:
        return select.additive_over_blocks([bmi.run_cost(i, i) for i in range(scores.n_blocks)])
    return select.length_penalized(bmi.run_cost, 1.0 if objective is Objective.length else 0.0)


def objectives(scores: Scores, plan: Plan) -> list[Objective]:
    """The plan's forms that these scores can give (the compensated one needs the capture's projection taps)."""
    return [o for o in plan.objectives if o is not Objective.compensated or scores.recovery is not None]


def select_blocks(scores: Scores, plan: Plan, n_remove: int, scorer: RemovalScorer, reporter: Reporter = QUIET) -> tuple[list[int], SelectionInfo]:
    """The blocks `plan.method` removes. `scorer` scores removals for the methods that evaluate
    (MI-PRUN's verification, SLEB, ppl); its passes are counted in the returned info."""
    n = scores.n_blocks
    info = SelectionInfo(forward_passes=1)  # the capture pass
    method = plan.method
    if method in (Method.mi_prun, Method.mi_prun_exact):
        removed = mi_prun_select(scores, plan, n_remove, info, scorer, reporter)
    elif method is Method.shortgpt:
        removed = select.lowest_scores([1.0 - scores.cosine[i, i + 1] for i in range(n)], n_remove)
    elif method is Method.angular:
        removed = select.best_contiguous_run(n, n_remove, lambda a, b: float(scores.angular[a, b + 1]))
    elif method is Method.random:
        removed = select.random_select(n, n_remove, plan.seed)
    else:
        total = n if method is Method.ppl else sum(n - k for k in range(n_remove))
        with reporter.task(f"{method.value}: evaluating candidate removals", total) as advance:
            scorer.advance = advance
            if method is Method.sleb:
                removed = select.greedy_eval_select(n, n_remove, scorer)
            else:
                removed, _ = select.one_shot_eval_select(n, n_remove, scorer)
    # The scorer's work, whichever method used it (MI-PRUN's verification, SLEB, ppl; none for the rest).
    info.forward_passes += scorer.passes
    info.verified = len(scorer.nll)
    return removed, info


def propose(scores: Scores, plan: Plan, n_remove: int, info: SelectionInfo) -> list[Candidate]:
    """The optimum of each objective form: Fast-Block-Select, or the exact DP for mi-prun-exact."""
    n = scores.n_blocks
    bmi = scores.boundary_mi
    exact_method = plan.method is Method.mi_prun_exact
    # The exact optimum needs every run measured: free for the streamed token estimator,
    # expensive for population estimators, so only then is Fast-Block-Select's gap recorded.
    candidates = []
    for objective in objectives(scores, plan):
        cost = objective_cost(objective, scores)
        # (the compensated cost of a run is a fit: only Fast-Block-Select's candidates are measured)
        gap_is_cheap = bmi.table is not None and objective is not Objective.compensated
        counter = scores.recovery if objective is Objective.compensated else bmi
        if exact_method:
            removed = exact = select.exact_select(n, n_remove, cost)
        else:
            measured_before = counter.measured
            removed, trace = select.fast_block_select(n, n_remove, [cost(i, i) for i in range(n)], cost, plan.top_k)
            info.measured_runs += counter.measured - measured_before
            info.iterations += trace.iterations
            info.history += trace.history
            exact = select.exact_select(n, n_remove, cost) if gap_is_cheap else None
        candidates.append(Candidate(
            objective=objective.value, removed=removed, objective_cost=select.selection_cost(removed, cost),
            exact_cost=None if exact is None else select.selection_cost(exact, cost),
        ))
    if exact_method:
        info.measured_runs = bmi.measured + (scores.recovery.measured if scores.recovery is not None else 0)
    return candidates


def mi_prun_select(scores: Scores, plan: Plan, n_remove: int, info: SelectionInfo, scorer: RemovalScorer, reporter: Reporter) -> list[int]:
    """Propose the optimum of each form of the MI objective; with `plan.verify`, score each distinct
    proposal by calibration NLL (one scoring each) and keep the first form's optimum unless a later
    one scores lower by a paired test over windows (`_preferred`); then try `plan.swaps` single-block
    swaps of it per round, cheapest by the objective first, while one wins the same test."""
    info.candidates = propose(scores, plan, n_remove, info)
    distinct = list(dict.fromkeys(tuple(c.removed) for c in info.candidates))
    chosen = info.candidates[0]
    search = plan.verify and (len(distinct) > 1 or plan.swaps > 0)
    if search:
        start = time.perf_counter()
        with reporter.task("verifying MI-PRUN proposals on calibration text", None) as advance:
            scorer.advance = advance
            for candidate in info.candidates:
                candidate.calibration_nll = scorer(candidate.removed)
            chosen = _preferred(chosen, info.candidates[1:], scorer)
            chosen = _swap_search(chosen, scores, plan, n_remove, scorer, info)
        for c in info.candidates:
            c.window_nll = [round(float(v), 5) for v in scorer.window_nll[tuple(sorted(c.removed))]]
        info.verification = scorer.describe()
        info.verification_s = round(time.perf_counter() - start, 2)
    info.objective_cost, info.exact_cost = chosen.objective_cost, chosen.exact_cost
    return chosen.removed


def _swap_search(best: Candidate, scores: Scores, plan: Plan, n_remove: int, scorer: RemovalScorer, info: SelectionInfo) -> Candidate:
    """Local search around the best proposal: each round scores the `plan.swaps` single-block swaps
    the objective ranks cheapest (compensated when captured) and moves to the best that scores
    lower by the paired test (`_preferred`); at most SWAP_ROUNDS rounds."""
    objective = Objective.compensated if scores.recovery is not None else Objective.channel
    cost = objective_cost(objective, scores)
    for _ in range(SWAP_ROUNDS if plan.swaps else 0):
        tried = [
            Candidate(objective=f"swap ({objective.value})", removed=removed, objective_cost=select.selection_cost(removed, cost),
                      calibration_nll=scorer(removed))
            for removed in select.swap_neighbours(best.removed, scores.n_blocks, cost, plan.swaps)
        ]
        info.candidates += tried
        better = _preferred(best, sorted(tried, key=lambda c: c.calibration_nll), scorer)
        if better is best:
            break
        best = better
    return best


def _preferred(incumbent: Candidate, challengers: list[Candidate], scorer: RemovalScorer) -> Candidate:
    """Walk the challengers in order: each displaces the removal kept so far only if it scores lower
    at LOWER_P (it records its p-value against that one). One equal to the kept removal does not
    challenge it."""
    for c in challengers:
        if sorted(c.removed) != sorted(incumbent.removed):
            c.lower_p = round(scorer.lower_p(c.removed, incumbent.removed), 6)
            if c.lower_p < LOWER_P:
                incumbent = c
    return incumbent
