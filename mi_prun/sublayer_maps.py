"""Linear compensation of removed runs of sublayers, folded into the kept sublayer before each run.

The block rule (`compensate.py`) one level down: a run of units first..last removed makes the
unit after it read s_first instead of s_{last+1}. The kept unit before the run (an attention or a
feed-forward sublayer) ends by adding its projection's output M to the stream, s_first = Y + M; a
ridge-fitted T with Y + M T ~ s_{last+1} folds into that projection (W <- T^T W: o_proj or
down_proj). Where the output is a deci GGUF (`Plan.run_map_slots`), a run that holds an attention
sublayer reading the run's input may instead carry its map in that attention's place, as deci's
linear attention: s_first + W norm(s_first) ~ s_{last+1}, a map of the whole normed stream rather
than of one projection's output. Each run takes the form with the lower cross-validated held-out
error (both are measured against the same plain-removal error, on the same folds). For the Llama family M is the unit's whole update, s_first - s_{first-1}, so every
fit reads the captured chain states alone: no pass is run for it. Each run is fitted on the dense
model's states (not on states with the earlier runs already removed, as blocks are): the verifier
then scores the whole pruned model, every map in place. Attention sublayers replaced by linear
maps (`linear_attention.py`) carry theirs in the output projection too.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .archs import blocks, get_path
from .compensate import RunCompensation, fit_run, run_moments
from .linear_attention import LinearMap, fit_slot
from .runner import Windows
from .select import runs_of


def projection(spec, unit: int) -> str:
    """The weight (inside the block) a unit adds to the stream through: a removed unit's zeros,
    or a kept unit's fitted map, go into it."""
    return f"{spec.attention_projection if unit % 2 == 0 else spec.residual_projection}.weight"


def gguf_projection(spec, unit: int) -> str:
    return f"blk.{unit // 2}.{'attn_output' if unit % 2 == 0 else spec.gguf_residual_projection}.weight"


def slot_of(first: int, last: int) -> int | None:
    """The block whose attention slot can hold the map of the run first..last (unit indices): the
    run's first attention sublayer, where it reads the run's input (the run starts with it, or with
    the feed-forward sublayer just before it); None: the run holds no such attention."""
    attention = first + first % 2
    return attention // 2 if attention <= last else None


def fit_unit_maps(loaded, chain: Windows, removed: Sequence[int], slots: bool = False) -> list[RunCompensation]:
    """One map per maximal run of `removed` units, fitted on the chain states of `chain`'s windows:
    folded into the unit before the run (none for a run starting at unit 0), or with `slots` in the
    run's attention slot where that has the lower held-out error. `first`, `last` and `prev` are
    unit indices."""
    spec, store = loaded.spec, loaded.runner.store
    out = []
    for first, last in runs_of(removed):
        record = RunCompensation(first, last, first - 1 if first > 0 else None)
        if record.prev is not None:
            h = chain.dense[first]
            folds = run_moments(h - chain.dense[first - 1], h, chain.dense[last + 1], chain.index)
            fit_run(record, folds, store.tensor(record.prev // 2, projection(spec, record.prev)), spec)
        block = slot_of(first, last) if slots else None
        if block is not None:
            fitted = fit_slot(loaded, block, chain.dense[first], chain.dense[last + 1], chain.index)
            if record.prev is None or fitted.heldout_ratio < record.heldout_ratio:
                record = RunCompensation(first, last, None, fitted.ridge, fitted.heldout_ratio, fitted.fit_ratio, fitted.weight, slot=block)
        out.append(record)
    return out


def slots_of(maps: Sequence[RunCompensation]) -> list[int]:
    """Blocks whose attention slot holds a removed run's map."""
    return sorted(r.slot for r in maps if r.slot is not None)


def linear_blocks(maps: Sequence[RunCompensation], linear: Sequence[LinearMap] = ()) -> list[int]:
    """Blocks whose attention slot runs as a linear map: kept attentions replaced (`linear`) and
    removed runs' maps."""
    return sorted({m.block for m in linear} | set(slots_of(maps)))


def dropped_blocks(removed: Sequence[int], slots: Sequence[int] = ()) -> list[int]:
    """Blocks both of whose units go, unless a run's map sits in its attention slot: dropped from
    the checkpoint, skipped when run."""
    units = set(removed)
    return sorted({u // 2 for u in units if u ^ 1 in units} - set(slots))


def block_overrides(loaded, removed: Sequence[int], maps: Sequence[RunCompensation],
                    linear: Sequence[LinearMap] = ()) -> dict[int, dict[str, torch.Tensor]]:
    """The weights each block runs with in the pruned model, by block and name inside it: zeros
    for removed units, fitted projections for the kept units before a run, and the maps of
    attention slots (linear attentions and runs' maps; those blocks then run under
    `runner.rewriting(..., linear_attention)`)."""
    spec, layers = loaded.spec, blocks(loaded.model, loaded.spec)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for u in removed:
        name = projection(spec, u)
        out.setdefault(u // 2, {})[name] = torch.zeros(get_path(layers[u // 2], name).shape, dtype=loaded.dtype)
    for r in maps:
        if r.slot is not None:
            out.setdefault(r.slot, {})[projection(spec, 2 * r.slot)] = r.weight
        elif r.weight is not None:
            out.setdefault(r.prev // 2, {})[projection(spec, r.prev)] = r.weight
    for m in linear:
        out.setdefault(m.block, {})[projection(spec, 2 * m.block)] = m.weight
    return out


def shipped_weights(loaded, removed: Sequence[int], maps: Sequence[RunCompensation],
                    linear: Sequence[LinearMap] = ()) -> dict[str, torch.Tensor]:
    """The same, by parameter name in the unpruned model, for blocks that stay (a block with both
    units removed is dropped, its zeros not needed)."""
    dropped = set(dropped_blocks(removed, slots_of(maps)))
    return {loaded.spec.block_param(b, name): value for b, weights in block_overrides(loaded, removed, maps, linear).items()
            if b not in dropped for name, value in weights.items()}


def gguf_weights(spec, maps: Sequence[RunCompensation], linear: Sequence[LinearMap] = ()) -> dict[str, np.ndarray]:
    """The fitted projections (and linear attentions' maps) by GGUF tensor name in the source
    (zeroed ones are left out of a deci GGUF instead)."""
    out = {gguf_projection(spec, 2 * r.slot if r.slot is not None else r.prev): r.weight.float().numpy() for r in maps if r.weight is not None}
    out.update({gguf_projection(spec, 2 * m.block): m.weight.float().numpy() for m in linear})
    return out
