"""Distillation and soft-target losses against the formulas, written out element by element."""

from __future__ import annotations

import math

import pytest
import torch

from xcit_ssl.losses.distillation import (
    DistillationLoss,
    classification_loss,
    hard_distillation_loss,
    soft_distillation_loss,
    soft_target_cross_entropy,
)


def _softmax_row(row: list[float], tau: float = 1.0) -> list[float]:
    exps = [math.exp(v / tau) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _logits(b: int = 5, c: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_hard_distillation_is_ce_against_teacher_argmax() -> None:
    s, t = _logits(seed=1), _logits(seed=2)
    expected = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        target = max(range(len(trow)), key=lambda j: trow[j])
        expected += -math.log(_softmax_row(srow)[target])
    expected /= len(s)
    assert hard_distillation_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_soft_distillation_is_tau_squared_kl_teacher_student(tau: float) -> None:
    s, t = _logits(seed=3), _logits(seed=4)
    expected = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        ps, pt = _softmax_row(srow, tau), _softmax_row(trow, tau)
        expected += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    expected = expected / len(s) * tau * tau
    assert soft_distillation_loss(s, t, tau).item() == pytest.approx(expected, rel=1e-5)


def test_soft_distillation_zero_for_identical_logits_and_no_teacher_gradient() -> None:
    s = _logits(seed=5).requires_grad_(True)
    t = s.detach().clone().requires_grad_(True)
    loss = soft_distillation_loss(s, t)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    shifted = soft_distillation_loss(s, t + 1.0)  # softmax is shift-invariant per row
    assert shifted.item() == pytest.approx(0.0, abs=1e-6)
    soft_distillation_loss(s, _logits(seed=6).requires_grad_(True)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_soft_target_ce_formula_and_one_hot_equals_cross_entropy() -> None:
    logits = _logits(seed=7)
    targets = torch.softmax(_logits(seed=8), dim=-1)
    expected = 0.0
    for lrow, trow in zip(logits.tolist(), targets.tolist()):
        p = _softmax_row(lrow)
        expected += -sum(q * math.log(pi) for q, pi in zip(trow, p))
    assert soft_target_cross_entropy(logits, targets).item() == pytest.approx(expected / len(logits), rel=1e-5)
    labels = torch.tensor([0, 3, 6, 1, 2])
    one_hot = torch.nn.functional.one_hot(labels, 7).double()
    torch.testing.assert_close(soft_target_cross_entropy(logits, one_hot).double(),
                               torch.nn.functional.cross_entropy(logits, labels))  # fmt: skip


def test_label_smoothing_of_index_targets_matches_smoothed_distribution() -> None:
    logits, labels = _logits(seed=9), torch.tensor([1, 0, 4, 6, 2])
    eps, c = 0.1, logits.shape[1]
    smoothed = torch.full((5, c), eps / c, dtype=torch.float64)
    smoothed[torch.arange(5), labels] += 1 - eps
    torch.testing.assert_close(classification_loss(logits, labels, eps).double(),
                               soft_target_cross_entropy(logits, smoothed).double())  # fmt: skip


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_combined_loss_weights_base_and_distillation(kind: str) -> None:
    s, t, labels = _logits(seed=10), _logits(seed=11), torch.tensor([0, 1, 2, 3, 4])
    loss_fn = DistillationLoss(kind, alpha=0.3, tau=2.0, label_smoothing=0.1)
    total, base, distill = loss_fn(s, labels, t)
    ref_base = classification_loss(s, labels, 0.1)
    ref_distill = hard_distillation_loss(s, t) if kind == "hard" else soft_distillation_loss(s, t, 2.0)
    torch.testing.assert_close(base, ref_base)
    torch.testing.assert_close(distill, ref_distill)
    torch.testing.assert_close(total, 0.7 * ref_base + 0.3 * ref_distill)


def test_bad_settings_refused() -> None:
    with pytest.raises(ValueError, match="hard.*soft"):
        DistillationLoss("medium")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(alpha=1.5)
    with pytest.raises(ValueError, match="tau"):
        soft_distillation_loss(_logits(), _logits(seed=1), tau=0.0)
