"""Exponential moving averages of one network into another (DINO teacher, model EMA)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_ema(target: nn.Module, source: nn.Module, momentum: float, average_buffers: bool = False) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` for every parameter.

    Floating-point buffers (BatchNorm running statistics) are averaged the same way when
    ``average_buffers``; otherwise the target keeps its own (DINO's policy). Integer buffers
    (``num_batches_tracked``) are copied when averaging. ``momentum == 1`` changes nothing.
    """
    tgt = [p for p in target.parameters()]
    src = [p.detach() for p in source.parameters()]
    if len(tgt) != len(src):
        raise ValueError("EMA target and source have different parameter lists")
    if momentum != 1.0:
        torch._foreach_mul_(tgt, momentum)
        torch._foreach_add_(tgt, src, alpha=1.0 - momentum)
    if average_buffers:
        for t, s in zip(target.buffers(), source.buffers()):
            if t.dtype.is_floating_point:
                t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
            else:
                t.copy_(s)
