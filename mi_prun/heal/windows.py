"""The heal text: the windows a heal trains on, and how many of them a logits micro-batch holds."""

from __future__ import annotations

import torch

from ..calibration import calibration_batches, text_windows
from ..choices import SELF_TEXT
from ..heal_plan import HealPlan
from ..plan import CalibrationSpec

# Bytes of logits a micro-batch may hold: windows x seq_len x vocabulary x 4 bytes, three times over
# (the student's logits, their float32 copy, the gradient); Gemma 3's 262k vocabulary takes one window at a time.
LOGIT_BYTES = 1536 * 2**20


def heal_windows(loaded, heal: HealPlan, seed: int) -> torch.Tensor:
    """The heal text: `heal.windows_of(source)` windows of each source (self-generated with a seed
    other than the calibration's, a file's or `python-docs`' windows), one after the other."""
    return torch.cat([_source_windows(loaded, heal, source, seed) for source in heal.sources()])


def _source_windows(loaded, heal: HealPlan, source: str, seed: int) -> torch.Tensor:
    wanted = heal.windows_of(source)
    if heal.samples is None and source != SELF_TEXT:
        # The default count of a text read is a ceiling: a shorter text gives the windows it holds.
        return text_windows(loaded, source, wanted, heal.seq_len, at_most=True, what="heal")
    return calibration_batches(loaded, CalibrationSpec(source, wanted, heal.seq_len, seed + 1))


def windows_at_once(model, ids: torch.Tensor) -> int:
    """Windows whose logits fit in LOGIT_BYTES together (at least one)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    return max(1, LOGIT_BYTES // (ids.shape[1] * vocab * 4 * 3))
