"""The healing loss: KL(dense || pruned) over each token's k most likely tokens under the dense model,
plus one bucket for the rest of the vocabulary.

Why not the full KL: the dense model's full next-token distribution is a vocabulary-wide log-softmax
per token, recomputed every step from its final states (the head's matmul) and compared with the
student's in several vocabulary-wide passes. On the default model (49k vocabulary) that was about
30% of a heal step. The dense side's top k log-probabilities are computed once instead, and the
student's side needs one log-sum-exp over the vocabulary and a gather of k entries. The rest bucket
keeps the mass outside the top k in the objective: the coarsened KL is the exact KL between the two
distributions over (top k, rest), never more than the full KL (coarsening loses information) and
equal to it when k is the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

TEACHER_TOP_K = 64
# A student's rest mass below this is taken as this: log(1 - sum q_k) stays finite when the
# student puts (in float32) all of its mass on the dense model's top k.
MIN_REST = 1e-6
MAX_TOP_LOG_MASS = math.log1p(-MIN_REST)  # log(1 - MIN_REST): the most a student's top k may hold


@dataclass
class TeacherTargets:
    """The dense model's k most likely next tokens at each position, and their log-probabilities."""

    log_probs: torch.Tensor  # (windows, positions, k) float32
    tokens: torch.Tensor  # (windows, positions, k) int64

    def __getitem__(self, rows: torch.Tensor) -> TeacherTargets:
        return TeacherTargets(self.log_probs[rows], self.tokens[rows])


def teacher_targets(logits_of: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, k: int,
                    windows_at_once: int = 1, advance: Callable[[], None] | None = None) -> TeacherTargets:
    """Top-k log-probabilities from the dense model's final states (windows, positions, hidden):
    `logits_of` maps (rows, hidden) states to (rows, vocabulary) logits; `advance` is called after
    each `windows_at_once` windows."""
    log_probs, tokens = [], []
    with torch.no_grad():
        for part in states.split(windows_at_once):
            logits = logits_of(part.reshape(-1, part.shape[-1])).float()
            top = torch.log_softmax(logits, dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
            log_probs.append(top.values.reshape(*part.shape[:2], -1).cpu())
            tokens.append(top.indices.reshape(*part.shape[:2], -1).cpu())
            if advance is not None:
                advance()
    return TeacherTargets(torch.cat(log_probs), torch.cat(tokens))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler, 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def coarse_kl(student_logits: torch.Tensor, target: TeacherTargets) -> torch.Tensor:
    """Mean over tokens of KL(dense || student) on (the dense top k, the rest):
    student_logits (..., vocabulary), target's tensors (..., k)."""
    logits = student_logits.float().reshape(-1, student_logits.shape[-1])
    log_p = target.log_probs.reshape(-1, target.log_probs.shape[-1]).to(logits.device)
    tokens = target.tokens.reshape(-1, target.tokens.shape[-1]).to(logits.device)
    log_q = logits.gather(-1, tokens) - torch.logsumexp(logits, dim=-1, keepdim=True)
    p = log_p.exp()
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest_log = _log1mexp(torch.logsumexp(log_q, dim=-1).clamp_max(MAX_TOP_LOG_MASS))
    kl = (p * (log_p - log_q)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest_log
    return kl.mean()
