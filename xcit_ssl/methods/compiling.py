"""``--model.compile true``: the backbones through ``torch.compile``, in place, with a fallback.

``nn.Module.compile()`` compiles a module's forward in place, so parameter names and checkpoints
are unchanged (no ``_orig_mod.`` prefix). With static shapes each input resolution gets its own
graph (multi-crop: the global and the local size for the student, the global size for the
teacher) and a fixed batch size (``drop_last``) keeps them from recompiling step after step. The
time the first calls spend compiling is logged once per graph.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def compile_unavailable_reason() -> str | None:
    """Why ``torch.compile`` cannot run here, or None when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if hasattr(dynamo, "is_dynamo_supported") and not dynamo.is_dynamo_supported():
            return "TorchDynamo does not support this Python/platform"
    except Exception as err:  # noqa: BLE001 - an import failure is the reason itself
        return f"torch._dynamo cannot be imported ({err})"
    return None


class _CompileTimer:
    """Logs how long the first call of each input shape took (compilation included)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: set[tuple[int, ...]] = set()
        self.start: dict[tuple[int, ...], float] = {}

    def before(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        shape = tuple(args[0].shape) if args and hasattr(args[0], "shape") else ()
        if shape not in self.seen:
            self.start[shape] = time.perf_counter()

    def after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        shape = tuple(args[0].shape) if args and hasattr(args[0], "shape") else ()
        if shape in self.start and shape not in self.seen:
            self.seen.add(shape)
            logger.info("compiled %s for input %s in %.1f s", self.name, list(shape), time.perf_counter() - self.start.pop(shape))


def compile_backbones(modules: dict[str, nn.Module], mode: str | None = None) -> bool:
    """Compile each module in place; False (with one warning) where torch.compile is unavailable."""
    reason = compile_unavailable_reason()
    if reason is not None:
        logger.warning("--model.compile true: %s; training runs eagerly", reason)
        return False
    for name, module in modules.items():
        timer = _CompileTimer(name)
        # nn.Module.compile() traces the hooks too: kept out of the graph (a clock is no tensor op;
        # traced, it breaks the graph and Dynamo warns about time.perf_counter at every first call)
        disable = getattr(torch.compiler, "disable", lambda fn: fn)
        module.register_forward_pre_hook(disable(timer.before))
        module.register_forward_hook(disable(timer.after))
        module.compile(mode=mode, dynamic=False)
    return True
