"""Top-k accuracy, once: used by k-NN, the linear probes, ``validate`` and supervised validation."""

from __future__ import annotations

from torch import Tensor


def topk_hits(scores: Tensor, labels: Tensor, k: int, positive_only: bool = False) -> Tensor:
    """``[M]`` bool: the true class is among the ``k`` highest of ``scores [M, C]`` (``k`` is
    clipped to ``C``). ``positive_only``: a class scoring 0 never counts as a hit, so a k-NN vote
    with fewer than ``k`` voted classes does not depend on the order of zero-score ties (DINO's
    ``sort`` did)."""
    k = min(k, scores.shape[1])
    top_scores, top_classes = scores.topk(k, dim=1)
    hits = top_classes == labels[:, None]
    if positive_only:
        hits &= top_scores > 0
    return hits.any(dim=1)


def top1_top5_correct(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """How many rows of ``logits [B, C]`` have ``labels [B]`` first, and among their top 5 (0-dim tensors)."""
    return topk_hits(logits, labels, 1).sum(), topk_hits(logits, labels, 5).sum()
