"""Top-k accuracy, once: used by k-NN, the linear probes, ``validate`` and supervised validation.

Top-5 says nothing with 5 classes or fewer (the true class is always among the 5 highest scores):
:func:`top5_applies` is the one rule, :func:`top5_note` the one sentence that says so in results.
"""

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


def top5_applies(num_classes: int) -> bool:
    """Whether top-5 accuracy means anything: more than 5 classes."""
    return num_classes > 5


def top5_note(num_classes: int) -> str:
    """Why a result reports no top-5 (its JSON holds ``top5: null`` and this note; tables show ``-``)."""
    return (f"top-5 not reported: with {num_classes} classes (5 or fewer) the true class is always among "
            "the 5 highest scores, so top-5 would read (nearly) 100 % whatever the features")  # fmt: skip
