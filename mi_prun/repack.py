"""Repack a decision into files: the kept blocks renumbered, the compensation maps folded in.

A loaded model is left as it was (every change is undone after saving), so quality can be
measured before or after repacking alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .archs import ArchSpec
from .blockset import blocks_kept
from .compensate import RunCompensation, applied


def save_checkpoint(loaded, kept: Sequence[int], runs: Sequence[RunCompensation], folder: Path) -> None:
    """A plain transformers checkpoint of the kept blocks with the maps folded in, into `folder`."""
    # The fitted maps go in by original block index, so before the blocks are renumbered.
    with applied(loaded.model, loaded.spec, runs), blocks_kept(loaded.model, loaded.spec, kept):
        loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)


def compensated_gguf_tensors(spec: ArchSpec, runs: Sequence[RunCompensation]) -> dict[str, np.ndarray]:
    """The weights rewritten by compensation, under their GGUF names (original block indices)."""
    return {
        f"blk.{r.prev}.{spec.gguf_residual_projection}.weight": r.weight.float().numpy()
        for r in runs
        if r.weight is not None
    }
