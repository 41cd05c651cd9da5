"""Classification and DeiT-style distillation losses (REFERENCE.md section 4). Pure functions.

XCiT has no distillation token: its single CLS head receives both terms,

    loss = (1 - alpha) * CE(student, targets) + alpha * distill(student, teacher)

- ``targets`` are either class indices ``[B]`` or soft targets ``[B, C]`` (mixup/CutMix with
  label smoothing folded in), see :func:`soft_target_cross_entropy`.
- hard distillation: cross-entropy against the teacher's arg-max class (no smoothing);
- soft distillation: ``tau**2 * KL(softmax(t / tau) || softmax(s / tau))``, averaged over the
  batch (the standard Hinton form). DeiT's code divides the summed KL by ``B * C`` instead of
  ``B``, which makes its soft term C times smaller; we keep the per-sample KL so that alpha means
  what it says whatever the number of classes.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

DistillationKind = Literal["hard", "soft"]

__all__ = [
    "DistillationKind",
    "DistillationLoss",
    "classification_loss",
    "hard_distillation_loss",
    "soft_distillation_loss",
    "soft_target_cross_entropy",
]


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_b sum_c -targets[b, c] * log_softmax(logits)[b, c]``; logits, targets ``[B, C]``.

    With one-hot targets it is the ordinary cross-entropy. Computed in float32 so bf16 logits do
    not lose the small target mass that label smoothing spreads over the classes.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and soft targets {tuple(targets.shape)} differ in shape")
    return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def classification_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against class indices ``[B]`` (with label smoothing) or soft targets ``[B, C]``.

    Soft targets already carry their smoothing (timm's Mixup builds them), so ``label_smoothing``
    only applies to index targets.
    """
    if targets.ndim == logits.ndim:
        return soft_target_cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def hard_distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """DeiT hard distillation: CE(student, argmax teacher); both ``[B, C]``, teacher detached."""
    return F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(dim=-1))


def soft_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0) -> Tensor:
    """``tau**2 * mean_b KL(p_t || p_s)`` with ``p = softmax(logits / tau)``; inputs ``[B, C]``.

    The ``tau**2`` factor keeps the gradient scale independent of the temperature (Hinton et al.).
    """
    if tau <= 0:
        raise ValueError(f"distillation temperature tau must be positive, got {tau}")
    log_p_student = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * tau * tau


class DistillationLoss:
    """``(1 - alpha) * classification + alpha * distillation``, returning the parts as well.

    Args:
        kind: ``"hard"`` (DeiT default) or ``"soft"``.
        alpha: weight of the distillation term, in [0, 1] (DeiT and XCiT: 0.5).
        tau: softmax temperature of the soft variant (DeiT: 1.0); ignored by ``"hard"``.
        label_smoothing: applies to index targets only (soft targets carry their own).
    """

    def __init__(
        self, kind: DistillationKind = "hard", alpha: float = 0.5, tau: float = 1.0, label_smoothing: float = 0.0
    ) -> None:
        if kind not in ("hard", "soft"):
            raise ValueError(f"distillation must be 'hard' or 'soft', got {kind!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must lie in [0, 1], got {alpha}")
        if tau <= 0:
            raise ValueError(f"distillation tau must be positive, got {tau}")
        self.kind, self.alpha, self.tau, self.label_smoothing = kind, alpha, tau, label_smoothing

    def __call__(self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(total, base, distill)``; logits ``[B, C]``, targets ``[B]`` or ``[B, C]``."""
        base = classification_loss(student_logits, targets, self.label_smoothing)
        if self.kind == "hard":
            distill = hard_distillation_loss(student_logits, teacher_logits)
        else:
            distill = soft_distillation_loss(student_logits, teacher_logits, self.tau)
        return (1.0 - self.alpha) * base + self.alpha * distill, base, distill
