"""Gradient checkpointing that leaves BatchNorm statistics as a plain forward pass would.

``torch.utils.checkpoint`` reruns a block's forward during backward. XCA blocks hold a BatchNorm
(in LPI), which in train mode updates ``running_mean``, ``running_var`` and
``num_batches_tracked`` on every forward, so a plain checkpoint updates them twice per step and
the running statistics drift away from those of an uncheckpointed run. Here the recomputation
runs inside a context that puts those buffers back as they were: the recomputed activations are
the same (train-mode BN normalises with the batch's own statistics), and the buffers are updated
once, by the original forward.
"""

from __future__ import annotations

from contextlib import nullcontext
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


class RestoreBatchNormBuffers:
    """On exit, every BatchNorm buffer of ``module`` holds the value it had on entry."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[tuple[Tensor, Tensor]] = []

    def __enter__(self) -> RestoreBatchNormBuffers:
        self.saved = [
            (buf, buf.detach().clone())
            for m in self.module.modules()
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
            if buf is not None
        ]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # also on the early-stop exception torch raises once the needed tensors are recomputed
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []


def checkpoint_module(module: nn.Module, *args: Any) -> Any:
    """``module(*args)`` under non-reentrant gradient checkpointing, BatchNorm buffers updated once.

    Same outputs and gradients as ``module(*args)`` (RNG state, e.g. drop-path masks, is replayed
    by torch), and the same BatchNorm buffers afterwards.
    """
    return checkpoint(
        module,
        *args,
        use_reentrant=False,
        context_fn=lambda: (nullcontext(), RestoreBatchNormBuffers(module)),
    )
