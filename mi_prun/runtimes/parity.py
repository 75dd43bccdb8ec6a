"""How closely a runtime's next-token distributions follow transformers' (or another runtime's) on the same tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Parity:
    tokens: int
    top1: float  # fraction of positions with the same argmax
    mean_kl: float  # mean KL(transformers || runtime) per position, nats
    max_kl: float


def compare_logits(reference, other) -> Parity:
    """Both (positions, vocab) logits (numpy arrays or torch tensors) over the same token sequence."""
    import torch

    ref = torch.log_softmax(torch.as_tensor(reference, dtype=torch.float64), -1)
    out = torch.log_softmax(torch.as_tensor(other, dtype=torch.float64), -1)
    if ref.shape != out.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(out.shape)}")
    kl = (ref.exp() * (ref - out)).sum(-1)
    return Parity(ref.shape[0], float((ref.argmax(-1) == out.argmax(-1)).double().mean()), float(kl.mean()), float(kl.max()))


def transformers_logits(model, tokens: list[int]) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens], device=device)).logits[0].float().cpu().numpy()


def log_softmax_rows(logits: np.ndarray, chunk: int = 64):
    """Row blocks of float64 log-probabilities (a 262k vocabulary makes one 512-row block 1 GiB)."""
    for start in range(0, len(logits), chunk):
        block = np.array(logits[start : start + chunk], dtype=np.float64)
        block -= block.max(-1, keepdims=True)
        yield start, block - np.log(np.exp(block).sum(-1, keepdims=True))


class WindowScore:
    """NLL over windows of tokens, and KL(reference || model) and top-1 agreement where a
    reference's logits are given for the same positions: what llama.cpp's and onnxruntime's
    comparisons accumulate, window by window."""

    def __init__(self) -> None:
        self.nll, self.count, self.kl, self.agree, self.compared = 0.0, 0, 0.0, 0, 0

    def add(self, window: np.ndarray, logits: np.ndarray, reference: np.ndarray | None = None) -> None:
        """`logits` (and `reference`): at least len(window) - 1 rows, row i predicting window[i + 1]."""
        n = len(window) - 1
        theirs_rows = log_softmax_rows(reference[:n]) if reference is not None else None
        # One log-softmax of the model's logits serves the NLL and the comparison.
        for start, mine in log_softmax_rows(logits[:n]):
            rows = np.arange(start, start + len(mine))
            self.nll -= float(mine[rows - start, window[rows + 1]].sum())
            if theirs_rows is not None:
                _, theirs = next(theirs_rows)
                self.kl += float((np.exp(theirs) * (theirs - mine)).sum())
                self.agree += int((theirs.argmax(-1) == mine.argmax(-1)).sum())
                self.compared += len(mine)
        self.count += n

    def result(self) -> dict:
        from mi_prun.metrics import ppl_from_nll

        out = {"ppl": ppl_from_nll(self.nll / self.count), "tokens": self.count}
        if self.compared:
            out.update(kl_to_dense=self.kl / self.compared, top1_agreement=self.agree / self.compared, compared_tokens=self.compared)
        return out
