"""Which blocks each method removes: scores (and a verifier for the methods that evaluate) in,
original block indices out. MI-PRUN proposes the optimum of several forms of its objective and
keeps the one the verifier scores best."""

from __future__ import annotations

from enum import Enum

from . import select
from .manifest import Candidate, SelectionInfo
from .plan import Method, Plan
from .progress import QUIET, Reporter
from .scoring import BoundaryMI, Scores
from .verify import RemovalScorer


class Objective(str, Enum):
    """Forms of the MI-PRUN objective whose optima are proposed; all built from the same run MI.

    channel: a run costs its measured lost fraction exp(-2 I(h_{i-1}; h_j)) (favours one long run);
    per_block: a run costs the sum of its blocks' lost fractions (no interaction, one-shot);
    length: the run's lost fraction times its length (between the two).
    """

    channel = "channel"
    per_block = "per-block"
    length = "length-penalized"


def objective_cost(objective: Objective, bmi: BoundaryMI, n_blocks: int) -> select.RunCost:
    if objective is Objective.per_block:
        return select.additive_over_blocks([bmi.run_cost(i, i) for i in range(n_blocks)])
    return select.length_penalized(bmi.run_cost, 1.0 if objective is Objective.length else 0.0)


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
        info.forward_passes += scorer.passes
    return removed, info


def propose(scores: Scores, plan: Plan, n_remove: int, info: SelectionInfo) -> list[Candidate]:
    """The optimum of each objective form: Fast-Block-Select, or the exact DP for mi-prun-exact."""
    n = scores.n_blocks
    bmi = scores.boundary_mi
    exact_method = plan.method is Method.mi_prun_exact
    # The exact optimum needs every run measured: free for the streamed token estimator,
    # expensive for population estimators, so only then is Fast-Block-Select's gap recorded.
    gap_is_cheap = bmi.table is not None
    candidates = []
    for objective in Objective:
        cost = objective_cost(objective, bmi, n)
        if exact_method:
            removed = exact = select.exact_select(n, n_remove, cost)
        else:
            measured_before = bmi.measured
            removed, trace = select.fast_block_select(n, n_remove, [cost(i, i) for i in range(n)], cost, plan.top_k)
            info.measured_runs += bmi.measured - measured_before
            info.iterations += trace.iterations
            info.history += trace.history
            exact = select.exact_select(n, n_remove, cost) if gap_is_cheap else None
        candidates.append(Candidate(
            objective=objective.value, removed=removed, objective_cost=select.selection_cost(removed, cost),
            exact_cost=None if exact is None else select.selection_cost(exact, cost),
        ))
    if exact_method:
        info.measured_runs = bmi.measured
    return candidates


def mi_prun_select(scores: Scores, plan: Plan, n_remove: int, info: SelectionInfo, scorer: RemovalScorer, reporter: Reporter) -> list[int]:
    """Propose the optimum of each form of the MI objective; when they differ and `plan.verify`,
    keep the one with the lowest calibration NLL (one scoring per distinct proposal)."""
    info.candidates = propose(scores, plan, n_remove, info)
    distinct = list(dict.fromkeys(tuple(c.removed) for c in info.candidates))
    chosen = info.candidates[0]
    if plan.verify and len(distinct) > 1:
        with reporter.task("verifying MI-PRUN proposals on calibration text", len(distinct)) as advance:
            scorer.advance = advance
            for candidate in info.candidates:
                candidate.calibration_nll = scorer(candidate.removed)
        info.forward_passes += scorer.passes
        info.verification = scorer.describe()
        chosen = min(info.candidates, key=lambda c: c.calibration_nll)
    info.objective_cost, info.exact_cost = chosen.objective_cost, chosen.exact_cost
    return chosen.removed
