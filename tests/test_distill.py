"""The healing loss: KL(dense || pruned) over the dense top k and a bucket for the rest."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mi_prun.distill import coarse_kl, teacher_targets


def _pair(vocab: int = 50, rows: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(rows, vocab, generator=g) * 3
    student = dense + torch.randn(rows, vocab, generator=g)
    return dense, student


def _targets(dense: torch.Tensor, k: int):
    # One "window" of rows positions; the head is the identity (states are logits already).
    return teacher_targets(lambda states: states, dense.unsqueeze(0), k)


def test_with_k_the_vocabulary_it_is_the_full_kl():
    dense, student = _pair()
    full = F.kl_div(F.log_softmax(student, -1), F.log_softmax(dense, -1), log_target=True, reduction="batchmean")
    assert torch.allclose(coarse_kl(student.unsqueeze(0), _targets(dense, dense.shape[-1])), full, atol=1e-5)


def test_top_k_is_the_kl_between_the_coarsened_distributions():
    dense, student = _pair()
    k = 5
    p, q = dense.softmax(-1), student.softmax(-1)
    top = dense.topk(k, -1).indices
    rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, top, False)
    # Explicitly: the k entries of each distribution, then the mass of every other token summed.
    p_coarse = torch.cat([p.gather(-1, top), (p * rest).sum(-1, keepdim=True)], -1)
    q_coarse = torch.cat([q.gather(-1, top), (q * rest).sum(-1, keepdim=True)], -1)
    expected = (p_coarse * (p_coarse.log() - q_coarse.log())).sum(-1).mean()
    got = coarse_kl(student.unsqueeze(0), _targets(dense, k))
    assert torch.allclose(got, expected, atol=1e-5)
    full = F.kl_div(F.log_softmax(student, -1), F.log_softmax(dense, -1), log_target=True, reduction="batchmean")
    assert got < full  # coarsening loses information, never adds it


def test_it_is_zero_at_the_dense_model_and_its_gradient_points_toward_it():
    dense, student = _pair()
    targets = _targets(dense, 8)
    assert coarse_kl(dense.unsqueeze(0), targets).abs() < 1e-5
    logits = student.clone().requires_grad_(True)
    before = coarse_kl(logits, targets)
    before.backward()
    with torch.no_grad():
        after = coarse_kl(logits - 0.5 * logits.grad, targets)
    assert after < before


def test_a_student_with_all_its_mass_on_the_top_k_gives_a_finite_loss():
    dense, _ = _pair(vocab=6, rows=3)
    targets = _targets(dense, 2)
    peaked = torch.full_like(dense, -1e4).scatter(-1, targets.tokens[0], 0.0).requires_grad_(True)
    loss = coarse_kl(peaked, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(peaked.grad).all()


def test_targets_come_in_parts_of_windows_and_say_so():
    states = torch.randn(5, 3, 7)
    called = []
    whole = teacher_targets(lambda s: s, states, 4)
    parted = teacher_targets(lambda s: s, states, 4, windows_at_once=2, advance=lambda: called.append(1))
    assert len(called) == 3  # 5 windows, 2 at a time
    assert torch.equal(parted.tokens, whole.tokens) and torch.allclose(parted.log_probs, whole.log_probs)
    assert whole.tokens.shape == (5, 3, 4)
