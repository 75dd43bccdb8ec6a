"""Keep a subset of blocks in a loaded model: renumber indices, slice per-layer config lists.

One mechanism serves both the permanent repack and the temporary block skipping that
evaluation-driven selection (SLEB, ppl) needs, so both see exactly the same pruned model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from torch import nn

from .archs import ArchSpec, blocks, get_path, set_path
from .errors import UserError


@dataclass
class _SavedState:
    layers: nn.ModuleList
    layer_count: int
    per_layer: dict[str, Any]
    indices: list[dict[str, int]]


def keep_indices(n_blocks: int, removed: Sequence[int]) -> list[int]:
    removed_set = set(removed)
    bad = [i for i in removed_set if not 0 <= i < n_blocks]
    if bad:
        raise UserError(f"block indices {sorted(bad)} are out of range for a model with {n_blocks} blocks")
    if len(removed_set) >= n_blocks:
        raise UserError(f"cannot remove all {n_blocks} blocks; remove fewer")
    return [i for i in range(n_blocks) if i not in removed_set]


def slice_config(config, spec: ArchSpec, keep: Sequence[int]) -> None:
    """Set the block count and slice every per-layer config list to the blocks `keep` (in place)."""
    count = getattr(config, spec.layer_count_key)
    for key in spec.per_layer_config_keys:
        values = getattr(config, key, None)
        if values is None:
            continue
        if len(values) != count:
            raise UserError(f"config.{key} has {len(values)} entries for {count} blocks; the checkpoint is inconsistent")
        setattr(config, key, [values[i] for i in keep])
    setattr(config, spec.layer_count_key, len(keep))


def _layer_index_attrs(block: nn.Module, spec: ArchSpec) -> dict[str, int]:
    found = {}
    for dotted in spec.layer_index_attrs:
        try:
            found[dotted] = get_path(block, dotted)
        except AttributeError:
            continue
    return found


def apply_keep(model: nn.Module, spec: ArchSpec, keep: Sequence[int]) -> _SavedState:
    """Make `model` consist of the blocks `keep` (original indices, ascending); return what it was."""
    config = model.config
    layers = blocks(model, spec)
    saved = _SavedState(
        layers=layers,
        layer_count=getattr(config, spec.layer_count_key),
        per_layer={k: getattr(config, k) for k in spec.per_layer_config_keys if getattr(config, k, None) is not None},
        indices=[_layer_index_attrs(b, spec) for b in layers],
    )
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, block in enumerate(kept):
        # The KV cache is indexed by layer_idx: a stale index would read another block's cache.
        for dotted in _layer_index_attrs(block, spec):
            set_path(block, dotted, new_index)
    slice_config(config, spec, keep)
    set_path(model, spec.blocks_path, kept)
    return saved


def restore(model: nn.Module, spec: ArchSpec, saved: _SavedState) -> None:
    set_path(model, spec.blocks_path, saved.layers)
    setattr(model.config, spec.layer_count_key, saved.layer_count)
    for key, values in saved.per_layer.items():
        setattr(model.config, key, values)
    for block, attrs in zip(saved.layers, saved.indices):
        for dotted, value in attrs.items():
            set_path(block, dotted, value)


@contextmanager
def blocks_kept(model: nn.Module, spec: ArchSpec, keep: Sequence[int]) -> Iterator[None]:
    saved = apply_keep(model, spec, keep)
    try:
        yield
    finally:
        restore(model, spec, saved)
