"""The DINO self-distillation loss, its center, and collapse diagnostics (REFERENCE.md section 2).

Views are stacked view-major: ``student_out`` is ``[V*B, K]`` with rows ``v*B .. v*B + B - 1``
holding view ``v`` of the ``B`` images; ``teacher_out`` is ``[G*B, K]`` for the ``G`` global views,
which are also the first ``G`` student views. For every pair (teacher view ``i``, student view
``v``) with ``v != i`` the loss is the cross-entropy ``-sum_k p_t[k] log p_s[k]`` averaged over the
batch; the result is the mean over the ``G*V - G`` pairs, where

    p_t = softmax((t - c) / tau_t)   (detached; c is the center)
    p_s = softmax(s / tau_s)

Softmaxes are computed in float32 whatever the input dtype: with ``tau_t = 0.04`` a bf16/fp16
logit range of a few units becomes ~100 after scaling, where half-precision exp/sum lose everything.

No Lightning, no config objects: plain tensors and floats in, tensors out.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOLoss", "collapse_kind", "dino_diagnostics"]


def _split_views(
    student_out: Tensor, teacher_out: Tensor, n_global: int, out_dim: int | None = None
) -> tuple[int, int, int]:
    """Validate shapes; return ``(V, G, B)``."""
    if student_out.ndim != 2 or teacher_out.ndim != 2:
        raise ValueError(
            "DINO loss expects 2-D logits student [V*B, K] and teacher [G*B, K], got "
            f"{tuple(student_out.shape)} and {tuple(teacher_out.shape)}"
        )
    k_s, k_t = student_out.shape[1], teacher_out.shape[1]
    if k_s != k_t or (out_dim is not None and k_s != out_dim):
        expected = f" (the loss was built for K={out_dim})" if out_dim is not None else ""
        raise ValueError(
            f"DINO loss: student K={k_s} and teacher K={k_t} must match{expected}; "
            "student and teacher heads need the same out_dim"
        )
    if n_global < 1:
        raise ValueError(f"DINO loss: n_global must be >= 1, got {n_global}")
    rows_t, rows_s = teacher_out.shape[0], student_out.shape[0]
    if rows_t == 0 or rows_t % n_global:
        raise ValueError(
            f"DINO loss: teacher rows ({rows_t}) must be a positive multiple of n_global={n_global}"
        )
    batch = rows_t // n_global
    if rows_s % batch:
        raise ValueError(
            f"DINO loss: student rows ({rows_s}) must be a multiple of the per-view batch {batch} "
            f"(= teacher rows {rows_t} / n_global {n_global})"
        )
    n_views = rows_s // batch
    if n_views < n_global:
        raise ValueError(
            f"DINO loss: the student has {n_views} views but the teacher {n_global}; the global "
            "views must also be the first student views"
        )
    if n_views == 1:
        raise ValueError("DINO loss: a single view gives no (teacher, other student view) pair")
    return n_views, n_global, batch


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _teacher_probs(teacher_out: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """``[G*B, K]`` -> float32 ``softmax((t - c) / tau_t)``, detached."""
    if not teacher_temp > 0:
        raise ValueError(f"DINO loss: teacher_temp must be > 0, got {teacher_temp}")
    t = teacher_out.detach().float()
    return F.softmax((t - center.float()) / teacher_temp, dim=-1)


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student distributions.

    Args:
        out_dim: K, the head's output size (the center is ``[1, K]``).
        student_temp: tau_s (0.1 in DINO).
        center_momentum: m in ``c <- m c + (1 - m) mean(teacher)`` (0.9 in DINO).

    ``forward`` does not touch the center; call ``update_center(teacher_out)`` after it (and
    after ``dino_diagnostics`` if you log them, so they see the center the loss used). Under
    gradient accumulation call ``accumulate_center`` once per micro-batch and ``flush_center``
    once per optimizer step: the center then moves once per step from all the step's teacher
    outputs, exactly as for one large batch, and every micro-batch's loss uses the same center.
    """

    center: Tensor
    pending_sum: Tensor
    pending_count: Tensor

    def __init__(
        self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"DINOLoss out_dim must be >= 1, got {out_dim}")
        if not student_temp > 0:
            raise ValueError(f"DINOLoss student_temp must be > 0, got {student_temp}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"DINOLoss center_momentum must be in [0, 1], got {center_momentum}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        # float32 and persistent: it is training state that resume must restore
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32))
        # this process's teacher-output sum and row count since the last flush: persistent too, so
        # a checkpoint written inside an accumulation window resumes it (normally they are zero;
        # under DDP such a checkpoint holds rank 0's sums, which every rank then resumes from)
        self.register_buffer("pending_sum", torch.zeros(1, out_dim, dtype=torch.float32))
        self.register_buffer("pending_count", torch.zeros((), dtype=torch.float32))

    def forward(
        self,
        student_out: Tensor,
        teacher_out: Tensor,
        teacher_temp: float,
        n_global: int = 2,
    ) -> Tensor:
        """Mean cross-entropy over the ``G*V - G`` (teacher view, other student view) pairs.

        Args:
            student_out: ``[V*B, K]`` student logits, view-major, global views first.
            teacher_out: ``[G*B, K]`` teacher logits of the global views (gradient is not used).
            teacher_temp: tau_t for this epoch.
            n_global: G.

        Returns:
            float32 scalar.
        """
        n_views, n_global, batch = _split_views(student_out, teacher_out, n_global, self.out_dim)
        k = self.out_dim
        p_t = _teacher_probs(teacher_out, self.center, teacher_temp).view(n_global, batch, k)
        log_p_s = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        log_p_s = log_p_s.view(n_views, batch, k)
        # sum over all (i, v) pairs of <p_t[i], log_p_s[v]> = <sum_i p_t[i], sum_v log_p_s[v]>,
        # minus the G same-view pairs: O((G + V) B K) instead of O(G V B K)
        all_pairs = (p_t.sum(0) * log_p_s.sum(0)).sum()
        same_view = (p_t * log_p_s[:n_global]).sum()
        n_pairs = n_global * n_views - n_global
        return -(all_pairs - same_view) / (n_pairs * batch)

    @torch.no_grad()
    def accumulate_center(self, teacher_out: Tensor) -> None:
        """Add a micro-batch's teacher outputs ``[G*B, K]`` to the pending sums; no collective."""
        if teacher_out.ndim != 2 or teacher_out.shape[1] != self.out_dim:
            raise ValueError(
                f"the DINO center expects teacher logits [G*B, {self.out_dim}], "
                f"got {tuple(teacher_out.shape)}"
            )
        t = teacher_out.detach().float().to(self.pending_sum.device)
        self.pending_sum.add_(t.sum(dim=0, keepdim=True))
        self.pending_count.add_(teacher_out.shape[0])

    @torch.no_grad()
    def flush_center(self) -> None:
        """One EMA step of the center towards the mean of all pending teacher outputs, then reset.

        With ``torch.distributed`` initialised and more than one process, the pending sums and
        row counts are all-reduced first (one collective for both), so every rank gets the same
        center, equal to the single-process center of the concatenated batch (uneven per-rank
        batches included). Every rank must call this (it is a collective). With nothing pending
        anywhere the center is left as it is.
        """
        # one all-reduce for both the sum and the count: [1, K + 1]
        stats = torch.cat([self.pending_sum, self.pending_count.view(1, 1)], dim=1)
        if _distributed():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        count = stats[:, -1:]
        # on the device, no host sync per step: an empty window keeps the center (momentum 1)
        batch_mean = stats[:, :-1] / count.clamp_min(1.0)
        m = self.center_momentum
        keep = torch.where(count > 0, m, 1.0)
        self.center.mul_(keep).add_(torch.where(count > 0, 1.0 - m, 0.0) * batch_mean)
        self.pending_sum.zero_()
        self.pending_count.zero_()

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """EMA of the center towards the teacher's mean output over the *global* batch.

        ``teacher_out``: ``[G*B, K]`` on this process; ``accumulate_center`` then ``flush_center``
        (see there: a collective every rank must call). For one optimizer step per batch.
        """
        self.accumulate_center(teacher_out)
        if teacher_out.shape[0] == 0 and not _distributed():
            raise ValueError("update_center got an empty teacher batch")
        self.flush_center()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # checkpoints written before the pending sums existed hold only the center; they were
        # saved with nothing pending, so zeros are their exact state (not a silent non-strict load)
        for name in ("pending_sum", "pending_count"):
            if prefix + "center" in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros_like(getattr(self, name))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"out_dim={self.out_dim}, student_temp={self.student_temp}, "
            f"center_momentum={self.center_momentum}"
        )


@torch.no_grad()
def dino_diagnostics(
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    teacher_temp: float,
    student_temp: float,
    n_global: int = 2,
) -> dict[str, Tensor]:
    """Quantities that tell the two DINO collapse modes apart (all float32 scalars, detached).

    The loss decomposes exactly as ``cross_entropy = teacher_entropy + kl_teacher_student``:

    - ``teacher_entropy``: mean over the ``G*B`` teacher rows of ``H(p_t)`` in nats. Goes to
      ``ln_k`` under uniform collapse, to 0 under one-hot collapse.
    - ``kl_teacher_student``: mean of ``KL(p_t[i] || p_s[v])`` over the loss's pairs ``v != i``;
      near 0 in both collapses (the student has nothing left to learn).
    - ``cross_entropy``: the loss value itself (same pairs); stuck at ``ln_k`` = uniform collapse.
    - ``student_entropy``: mean over the ``V*B`` student rows of ``H(p_s)``.
    - ``center_norm``: ``||c||_2``.
    - ``ln_k``: ``ln K``, the entropy of the uniform distribution, for reference.

    Args: as ``DINOLoss.forward``, plus the ``center`` ``[1, K]`` the loss used, ``student_temp``.
    """
    n_views, n_global, batch = _split_views(student_out, teacher_out, n_global)
    k = teacher_out.shape[1]
    if center.shape[-1] != k:
        raise ValueError(f"dino_diagnostics: center has K={center.shape[-1]}, logits K={k}")
    p_t = _teacher_probs(teacher_out, center, teacher_temp)
    log_p_t = torch.log(p_t.clamp_min(torch.finfo(torch.float32).tiny))
    log_p_s = F.log_softmax(student_out.detach().float() / student_temp, dim=-1)

    h_t = -(p_t * log_p_t).sum(-1)  # [G*B]
    h_s = -(log_p_s.exp() * log_p_s).sum(-1)  # [V*B]
    p_t, log_p_s = p_t.view(n_global, batch, k), log_p_s.view(n_views, batch, k)
    all_pairs = (p_t.sum(0) * log_p_s.sum(0)).sum()
    same_view = (p_t * log_p_s[:n_global]).sum()
    n_pairs = n_global * n_views - n_global
    cross_entropy = -(all_pairs - same_view) / (n_pairs * batch)
    teacher_entropy = h_t.mean()
    return {
        "teacher_entropy": teacher_entropy,
        # every teacher view enters the same number (V - 1) of pairs, so the pair-mean of H(p_t)
        # is the plain mean and CE - H is exactly the pair-mean KL
        "kl_teacher_student": cross_entropy - teacher_entropy,
        "cross_entropy": cross_entropy,
        "student_entropy": h_s.mean(),
        "center_norm": center.detach().float().norm(),
        "ln_k": torch.tensor(math.log(k), dtype=torch.float32, device=teacher_out.device),
    }


def collapse_kind(diagnostics: dict[str, Tensor], tolerance: float = 1e-3) -> str | None:
    """The one DINO collapse rule: ``"uniform"``, ``"one-hot"`` or ``None`` from ``dino_diagnostics``.

    Uniform output: the loss (``cross_entropy``) sits at ``ln K`` within ``tolerance * ln K``
    (11.09 for K = 65536). One-hot output: the teacher entropy is below ``tolerance * ln K``
    (REFERENCE.md section 2, collapse signatures). A freshly initialised head is close to uniform
    by construction, so act only when a signature persists (``DINO`` warns after
    ``collapse_patience`` checks in a row).
    """
    ln_k = float(diagnostics["ln_k"])
    if abs(float(diagnostics["cross_entropy"]) - ln_k) < tolerance * ln_k:
        return "uniform"
    if float(diagnostics["teacher_entropy"]) < tolerance * ln_k:
        return "one-hot"
    return None
