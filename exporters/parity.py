"""How closely a runtime's next-token distributions follow transformers' on the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Parity:
    tokens: int
    top1: float  # fraction of positions with the same argmax
    mean_kl: float  # mean KL(transformers || runtime) per position, nats
    max_kl: float


def compare_logits(reference: np.ndarray | torch.Tensor, other: np.ndarray | torch.Tensor) -> Parity:
    """Both (positions, vocab) logits over the same token sequence."""
    ref = torch.log_softmax(torch.as_tensor(reference, dtype=torch.float64), -1)
    out = torch.log_softmax(torch.as_tensor(other, dtype=torch.float64), -1)
    if ref.shape != out.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    kl = (ref.exp() * (ref - out)).sum(-1)
    return Parity(ref.shape[0], float((ref.argmax(-1) == out.argmax(-1)).double().mean()), float(kl.mean()), float(kl.max()))


@torch.no_grad()
def transformers_logits(model, tokens: list[int]) -> np.ndarray:
    device = next(model.parameters()).device
    return model(input_ids=torch.tensor([tokens], device=device)).logits[0].float().cpu().numpy()
