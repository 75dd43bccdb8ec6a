"""Sublayer pruning (--granularity sublayer): attention and feed-forward sublayers as the units removed.

A Llama-family block is two residual updates, h -> m = h + Attn(norm h) -> h' = m + FFN(norm m),
so L blocks are a chain of 2L units and 2L+1 residual states: unit 2b is block b's attention,
unit 2b+1 its feed-forward network. MI-PRUN scores that chain as it scores blocks (the same
estimator over the interleaved states, the same DPI bound), Fast-Block-Select picks runs of units
under a budget in bytes (a SmolLM2 attention sublayer is a third of its feed-forward one), and the
proposals are verified by calibration NLL in the form that ships.

The shipped form: a removed sublayer adds nothing to the stream. In the Hugging Face checkpoint
its output projection (o_proj or down_proj) is zero, so plain transformers loads it (and still
computes that sublayer); a block with both sublayers removed is dropped. The GGUF is llama.cpp's
`deci` (`runtimes/deci.py`): the removed sublayers' tensors are gone, and a layer without attention
has no KV cache. Each removed run gets a linear map folded into the kept sublayer before it
(`sublayer_maps.py`), as runs of blocks do, or, where only the deci GGUF is written and its
held-out error is lower, a linear map of the normed stream in the run's first attention slot. With `--linear-attention N`, N of the attention
sublayers the budget keeps become fitted linear maps (`linear_attention.py`: deci's linear
attention, no KV cache), the N whose replacement alone costs least calibration NLL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import select
from .archs import blocks
from .compensate import RunCompensation, can_compensate
from .errors import UserError
from .linear_attention import LinearMap, fit_linear_attention
from .manifest import Candidate, SelectionInfo, unit_name
from .methods import LOWER_P, objective_cost, objectives
from .plan import Method, Plan
from .progress import QUIET, Reporter
from .runner import Windows
from .runtimes.deci import Attention, LayerForm
from .runtimes.gguf_prune import BLOCK_TENSOR, open_gguf
from .scoring import Scores
from .sublayer_maps import block_overrides, dropped_blocks, fit_unit_maps, linear_blocks, slots_of
from .verify import lower_p, window_means

KINDS = ("attention", "ffn")
# GGUF tensor name prefixes of each kind's weights (its norm included).
GGUF_PREFIX = {"attention": "attn_", "ffn": "ffn_"}


def layer_forms(n_blocks: int, removed: Sequence[int], linear: Sequence[int] = ()) -> list[LayerForm]:
    """Each block's form: `removed` units, and the blocks in `linear` with their attention slot as
    a linear map (a kept attention replaced, or a removed run's map)."""
    units = set(removed)

    def attention(b: int) -> Attention:
        return Attention.linear if b in linear else Attention.removed if 2 * b in units else Attention.kept

    return [LayerForm(attention(b), 2 * b + 1 not in units) for b in range(n_blocks)]


def unit_sizes(loaded) -> list[int]:
    """Bytes of every unit as the source stores it: its GGUF tensors (the file's own
    quantization) or its parameters in the compute dtype."""
    n = loaded.runner.n_blocks
    if loaded.source.kind == "gguf":
        sizes = [0] * (2 * n)
        for t in open_gguf(Path(loaded.source.location) / loaded.source.gguf_file).tensors:
            match = BLOCK_TENSOR.match(t.name)
            if match:
                kind = next((k for k, p in GGUF_PREFIX.items() if match.group(2).startswith(p)), None)
                if kind is not None:
                    sizes[2 * int(match.group(1)) + KINDS.index(kind)] += int(t.n_bytes)
        return sizes
    spec = loaded.spec
    layer = blocks(loaded.model, spec)[0]
    attention = {spec.attention_projection.rpartition(".")[0], spec.block_input_norm}
    per_kind = [0, 0]
    for name, p in layer.named_parameters():
        per_kind[0 if name.split(".")[0] in attention else 1] += p.numel() * p.element_size()
    return per_kind * n


# --- the chain's states and scores -------------------------------------------------------------


def capture_chain(loaded, windows: Windows, reporter: Reporter = QUIET) -> Windows:
    """One dense pass over `windows` keeping every block boundary (in `windows.dense`, for the
    verifier) and returning the chain of 2L+1 unit boundaries: the state after each attention is
    the block's input plus what its output projection adds."""
    runner = loaded.runner
    h = runner.embed(windows.ids)
    chain = Windows(windows.ids, index=windows.index)
    with reporter.task("capturing sublayer boundaries", runner.n_blocks) as advance:
        for b in range(runner.n_blocks):
            windows.dense[b] = chain.dense[2 * b] = h
            tap: list = []
            out = runner.run_block(b, h, tap=tap, tap_path=loaded.spec.attention_projection)
            chain.dense[2 * b + 1] = h + tap[0].to(h.dtype)
            h = out
            advance()
    windows.dense[runner.n_blocks] = chain.dense[2 * runner.n_blocks] = h
    return chain


class UnitRemovalScorer:
    """Mean calibration NLL with `removed` units taken out as shipped (zero projections, both-gone
    blocks skipped, and with `compensate` the fitted maps in place) and the blocks in `linear` with
    their attention as fitted linear maps, from the cached dense state entering the first block it
    changes.

    Maps are cross-fitted like the block verifier: fitted on the even windows, scored on the odd
    ones and vice versa (scored on their own windows, removals with more fitted maps would look
    better than they are)."""

    def __init__(self, loaded, windows: Windows, chain: Windows, compensate: bool, slots: bool = False) -> None:
        self.loaded, self.windows, self.chain = loaded, windows, chain
        self.cross_fitted = len(windows) >= 2
        self.compensate = compensate and self.cross_fitted  # one window: nothing to score a map on but its own fit
        self.slots = slots  # removed runs' maps may sit in attention slots (`fit_unit_maps`)
        self.passes = 0
        self.window_nll: dict[tuple, np.ndarray] = {}
        self.nll: dict[tuple, float] = {}
        self._linear: dict[tuple[int, int], LinearMap] = {}  # (fit half, block) -> map
        # The removal maps of the last removal scored, per fit half: the linear-attention candidates
        # are all scored with the same removal (a removal's maps are megabytes, so one is kept).
        self._unit_maps: tuple[tuple[int, ...], list[list[RunCompensation] | None]] | None = None

    @staticmethod
    def key(removed: Sequence[int], linear: Sequence[int] = ()) -> tuple:
        return tuple(sorted(removed)), tuple(sorted(linear))

    def describe(self) -> str:
        shape = f"{len(self.windows)} windows x {self.windows.ids.shape[1]} tokens"
        if self.compensate:
            return f"compensated calibration NLL, sublayers removed as shipped, maps fitted on one half of {shape} and scored on the other"
        return f"calibration NLL on {shape}, sublayers removed as shipped"

    def __call__(self, removed: Sequence[int], linear: Sequence[int] = ()) -> float:
        key = self.key(removed, linear)
        units, blocks_linear = key
        if key not in self.nll:
            if self.cross_fitted and (self.compensate or blocks_linear):
                parts = []
                for parity in (0, 1):
                    fit_chain, scored = self.chain.half(1 - parity), self.windows.half(parity)
                    maps = self._removal_maps(1 - parity, fit_chain, units) if self.compensate else []
                    lin = [self._linear_map(1 - parity, fit_chain, b) for b in blocks_linear]
                    totals, counts = self._nll(scored, units, maps, lin)
                    parts.append((scored.index * 2 + parity, totals, counts))
            else:
                lin = [fit_linear_attention(self.loaded, self.chain, b) for b in blocks_linear]
                parts = [(self.windows.index, *self._nll(self.windows, units, [], lin))]
            self.window_nll[key], self.nll[key] = window_means(parts)
        return self.nll[key]

    def _removal_maps(self, half: int, chain: Windows, units: tuple[int, ...]) -> list[RunCompensation]:
        if self._unit_maps is None or self._unit_maps[0] != units:
            self._unit_maps = units, [None, None]
        halves = self._unit_maps[1]
        if halves[half] is None:
            halves[half] = fit_unit_maps(self.loaded, chain, units, self.slots)
        return halves[half]

    def _linear_map(self, half: int, chain: Windows, block: int) -> LinearMap:
        if (half, block) not in self._linear:
            self._linear[half, block] = fit_linear_attention(self.loaded, chain, block)
        return self._linear[half, block]

    def _nll(self, windows: Windows, removed: Sequence[int], maps, linear: Sequence[LinearMap] = ()) -> tuple[np.ndarray, np.ndarray]:
        runner = self.loaded.runner
        overrides = block_overrides(self.loaded, removed, maps, linear)
        first = min(overrides)
        dropped = set(dropped_blocks(removed, slots_of(maps)))
        as_linear = linear_blocks(maps, linear)
        h = windows.dense[first]
        with runner.rewriting({}, as_linear):
            for b in range(first, runner.n_blocks):
                if b in dropped:
                    continue
                h = runner.run_block(b, h, weights=overrides.get(b))
        self.passes += 1
        return runner.window_nll(h, windows.ids)


# --- selection ---------------------------------------------------------------------------------


def propose(scores: Scores, plan: Plan, sizes: Sequence[int], budget: int) -> list[Candidate]:
    """Fast-Block-Select's choice over the unit chain for each objective form of the plan."""
    out = []
    for objective in objectives(scores, plan):
        cost = objective_cost(objective, scores)
        unit_cost = [scores.boundary_mi.run_cost(i, i) for i in range(scores.n_blocks)]
        removed, _ = select.fast_block_select(scores.n_blocks, budget, unit_cost, cost, plan.top_k, sizes)
        out.append(Candidate(objective=objective.value, removed=removed, objective_cost=select.selection_cost(removed, cost)))
    return out


def choose(candidates: list[Candidate], scorer: UnitRemovalScorer, reporter: Reporter) -> Candidate:
    """The first proposal, unless another scores a lower calibration NLL beyond the windows' noise
    (the block rule: a paired one-sided t-test at LOWER_P)."""
    best = candidates[0]
    distinct = {tuple(c.removed) for c in candidates}
    for c in candidates:
        if len(distinct) > 1:
            c.calibration_nll = scorer(c.removed)
            c.window_nll = scorer.window_nll[scorer.key(c.removed)].tolist()
    for c in candidates[1:]:
        if c.calibration_nll is None or c.removed == best.removed:
            continue
        c.lower_p = lower_p(np.array(c.window_nll), np.array(best.window_nll))
        if c.calibration_nll < best.calibration_nll and c.lower_p < LOWER_P:
            best = c
    reporter.say(f"sublayers chosen by the {best.objective} proposal: {', '.join(unit_name(u) for u in best.removed)}")
    return best


def select_units(scores: Scores, plan: Plan, sizes: Sequence[int], budget: int, scorer: UnitRemovalScorer,
                 reporter: Reporter = QUIET) -> tuple[list[int], SelectionInfo]:
    info = SelectionInfo(forward_passes=1)
    if plan.method is Method.shortgpt:
        removed = select.lowest_until([1.0 - scores.cosine[u, u + 1] for u in range(scores.n_blocks)], sizes, budget)
    elif plan.method is Method.angular:
        removed = select.contiguous_until(sizes, budget, lambda a, b: float(scores.angular[a, b + 1]))
    elif plan.method is Method.sleb:
        with reporter.task("sleb (BlockPruner's greedy search): removing the sublayer that hurts least, until the budget", None) as step:
            removed = select.greedy_eval_until(sizes, budget, scorer, step)
    else:
        candidates = propose(scores, plan, sizes, budget)
        best = choose(candidates, scorer, reporter) if plan.verify else candidates[0]
        removed = best.removed
        info.candidates, info.objective_cost = candidates, best.objective_cost
        info.verification = scorer.describe() if plan.verify else None
    info.forward_passes += scorer.passes
    info.verified = len(scorer.nll)
    return removed, info


def linear_candidates(n_blocks: int, removed: Sequence[int], compensate: bool) -> list[int]:
    """Blocks whose attention may become a linear map: it is kept, and (with compensation) its
    block keeps all its units, so no removal map is folded into its output projection."""
    units = set(removed)
    return [b for b in range(n_blocks) if 2 * b not in units and not (compensate and 2 * b + 1 in units)]


def choose_linear(n_blocks: int, count: int, removed: Sequence[int], compensate: bool, scorer: UnitRemovalScorer,
                  reporter: Reporter = QUIET) -> tuple[list[int], dict[int, float]]:
    """The `count` attention sublayers whose replacement by a linear map, each alone with the
    removal in place, costs least calibration NLL (cross-fitted); with each candidate's NLL."""
    candidates = linear_candidates(n_blocks, removed, compensate)
    if count > len(candidates):
        raise UserError(f"--linear-attention {count}: only {len(candidates)} attention sublayers can become linear maps "
                        f"once {', '.join(unit_name(u) for u in removed)} are removed; ask for fewer")
    alone: dict[int, float] = {}
    with reporter.task(f"scoring {len(candidates)} attention sublayers as linear maps", len(candidates)) as advance:
        for b in candidates:
            alone[b] = scorer(removed, [b])
            advance()
    chosen = sorted(sorted(alone, key=alone.get)[:count])
    reporter.say(f"attention as linear maps: blocks {chosen}")
    return chosen, alone


@dataclass(frozen=True)
class SublayerDecision:
    """What a sublayer run removed: units (2b attention, 2b+1 feed-forward of block b), their
    sizes, the maps fitted for the runs (unit indices; empty without compensation), and the
    attention sublayers replaced by linear maps."""

    removed: list[int]
    sizes: list[int]
    budget_bytes: int
    scores: Scores
    maps: list[RunCompensation] = field(default_factory=list)
    linear: list[LinearMap] = field(default_factory=list)
    linear_nll: dict[int, float] = field(default_factory=dict)  # each candidate block alone, as linear
    calibration_nll: float | None = None  # the decision as shipped, when --linear-attention scored it

    @property
    def linear_blocks(self) -> list[int]:
        """Blocks whose attention slot is a linear map: kept attentions replaced, and runs' maps."""
        return linear_blocks(self.maps, self.linear)

    @property
    def dropped(self) -> list[int]:
        return dropped_blocks(self.removed, slots_of(self.maps))

    def forms(self, n_blocks: int) -> list[LayerForm]:
        return layer_forms(n_blocks, self.removed, self.linear_blocks)


def decide(loaded, plan: Plan, scores: Scores, windows: Windows, chain: Windows,
           reporter: Reporter = QUIET) -> tuple[SublayerDecision, SelectionInfo]:
    """The units a plan removes, at a budget of `plan.n_remove` blocks' worth of bytes, the
    attention sublayers it makes linear, and the maps of both fitted on every window of `windows`
    (the calibration windows, or the compensation windows where --compensation-samples sets them)."""
    sizes = unit_sizes(loaded)
    n = loaded.runner.n_blocks
    budget = plan.n_remove(n) * sum(sizes) // n
    reporter.say(f"budget: {budget / 2**20:.1f} MiB of sublayers ({plan.n_remove(n)} blocks' worth)")
    compensate = plan.compensate and can_compensate(loaded.spec)
    scorer = UnitRemovalScorer(loaded, windows, chain, compensate, plan.run_map_slots)
    removed, info = select_units(scores, plan, sizes, budget, scorer, reporter)
    linear_blocks, linear_nll, nll = [], {}, None
    if plan.linear_attention:
        passes = scorer.passes
        linear_blocks, linear_nll = choose_linear(n, plan.linear_attention, removed, compensate, scorer, reporter)
        nll = scorer(removed, linear_blocks)
        info.forward_passes += scorer.passes - passes
    maps = fit_unit_maps(loaded, chain, removed, plan.run_map_slots) if compensate else []
    linear = [fit_linear_attention(loaded, chain, b) for b in linear_blocks]
    return SublayerDecision(removed, sizes, budget, scores, maps, linear, linear_nll, nll), info
