"""Trained adapters merged into plain weights, and healed weights folded into a run's compensation."""

from __future__ import annotations

from typing import Sequence

import torch

from ..archs import ArchSpec, get_path
from ..compensate import RunCompensation, compensated_weights

ADAPTER = "heal"  # peft's name for the adapter: train.adapters injects it under this name, merged_weights reads its delta


def merged_weights(module, targets: list[str], norms: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Each adapted linear layer's weight with its adapter merged (W + scale B A), and each trained
    norm's weight, by parameter name in `module`."""
    out = {f"{norm}.weight": get_path(module, norm).weight.detach().clone().cpu() for norm in norms}
    for name in targets:
        layer = get_path(module, name)
        with torch.no_grad():
            merged = layer.base_layer.weight.float() + layer.get_delta_weight(ADAPTER).float()
        out[f"{name}.weight"] = merged.to(layer.base_layer.weight.dtype).detach().cpu()
    return out


def fold_healed(runs: list[RunCompensation], weights: dict[str, torch.Tensor], spec: ArchSpec) -> dict[str, torch.Tensor]:
    """A healed residual projection of a compensated block replaces that run's fitted weight (it
    was trained on top of it); the other healed weights are returned, to be written as they are."""
    rest = dict(weights)
    for run in runs:
        name = next(iter(compensated_weights(spec, [run])), None)
        if name in rest:
            run.weight = rest.pop(name)
    return rest
