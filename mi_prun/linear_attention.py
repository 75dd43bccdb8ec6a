"""Attention replaced by a fitted linear map: llama.cpp deci's "linear attention" slot.

A deci layer with attention heads but no KV heads applies its output projection alone to the
normed input: a = W norm(h), no queries, keys, values or KV cache (Llama-3.1-Nemotron-51B ships
such layers). `--linear-attention N` replaces N attention sublayers that the budget keeps by such
maps: the file loses their q/k/v weights, and llama.cpp keeps no KV cache for them, which is what
grows with the context on a device.

The map is a ridge regression of the attention's output on its normed input over the calibration
tokens (each window's first token, the attention sink, kept exact as for compensation maps),
shrunk toward W = 0, i.e. toward dropping that attention: run through `ridge.py` as the regression
X T ~ X + A, whose shrinkage target T = I is W = 0, with W = (T - I)^T.

In the model the runner executes, the block's attention module is swapped for `LinearAttention`
(the block's own output projection holding W), so the selection scores what llama.cpp computes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from .archs import get_path, set_path
from .compensate import RunCompensation, fit_run, run_moments

if TYPE_CHECKING:
    from .runner import Windows


class LinearAttention(nn.Module):
    """Stands in for a block's attention module: its output projection applied to the normed input
    the block passes in, with no cache (the decoder layer unpacks (output, attention weights))."""

    def __init__(self, projection: nn.Module) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return self.projection(hidden_states), None


def attention_module(spec) -> str:
    """The attention module of a block: the parent of its output projection."""
    return spec.attention_projection.rpartition(".")[0]


@contextmanager
def linear_in(layer: nn.Module, spec) -> Iterator[None]:
    """`layer`'s attention is `LinearAttention` over its own output projection, for the duration."""
    path = attention_module(spec)
    original = get_path(layer, path)
    set_path(layer, path, LinearAttention(get_path(layer, spec.attention_projection)))
    try:
        yield
    finally:
        set_path(layer, path, original)


@dataclass
class LinearMap:
    """A block's attention as a fitted linear map: `weight` is its output projection's new value
    (out x in), W with a = W norm(h)."""

    block: int
    ridge: float
    heldout_ratio: float  # held-out error / error of dropping the attention, at the chosen ridge
    fit_ratio: float  # the same on all calibration tokens with the final map
    weight: torch.Tensor  # float32


@torch.no_grad()
def normed_inputs(loaded, block: int, states: torch.Tensor) -> torch.Tensor:
    """What block `block`'s attention reads from `states` (windows, seq, hidden): its input norm's output."""
    runner = loaded.runner
    with runner.open_block(block) as (layer, _):
        norm = get_path(layer, loaded.spec.block_input_norm)
        out = [norm(states[rows].to(runner.device)) for rows in runner.batches(states.shape[0])]
    return torch.cat(out)


def fit_slot(loaded, block: int, states: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> RunCompensation:
    """A map W for block `block`'s linear-attention slot with states + W norm(states) ~ target,
    over windows `index` (their positions in the whole set, which pick the folds); the record's
    `weight` is W (out x in, float32), its ridge and error ratios those of the fit (the errors
    relative to adding nothing)."""
    x = normed_inputs(loaded, block, states).to(states.dtype)
    record = RunCompensation(2 * block, 2 * block, 2 * block)
    folds = run_moments(x, x, x + target - states, index)
    identity = torch.eye(x.shape[-1], dtype=torch.float64)
    fit_run(record, folds, identity, loaded.spec)  # record.weight = T^T I
    record.weight = (record.weight - identity).float()
    return record


def fit_linear_attention(loaded, chain: "Windows", block: int) -> LinearMap:
    """Block `block`'s attention as a map fitted on `chain`'s dense states (unit 2b's input and output)."""
    record = fit_slot(loaded, block, chain.dense[2 * block], chain.dense[2 * block + 1], chain.index)
    return LinearMap(block, record.ridge, record.heldout_ratio, record.fit_ratio, record.weight)
