"""Refuse configurations that cannot run, before any process is spawned or folder created.

Lightning finds these out only after it has started ranks (four tracebacks for
``--trainer.devices 4`` with SyncBatchNorm on CPU) or built the trainer (FSDP on a CPU); one
message that names the flag to change is better.

Two kinds of refusal: those about this machine (no GPU visible, fewer devices than asked, a GPU
without bfloat16) and those about the config (settings that cannot run on the accelerator it
names, whatever the machine). A planner (``xcit-ssl doctor``) plans a cluster run from a laptop:
inside :func:`planning` only the config's refusals apply, and an ``auto`` accelerator, which
names no machine, is judged by neither.

On a CPU without bfloat16 units PyTorch runs bfloat16 matrix products in a slow fallback (28x
slower than float32 on a 2-core EPYC VM); :func:`bf16_slowdown` measures that once per process, and
:func:`precision_warnings` says so for a bf16 run on a CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import time
from typing import Any, Iterator

import torch

from ..devices import available_devices, lightning_accelerator, requested_devices
from ..errors import UserError

logger = logging.getLogger(__name__)

# bfloat16 this many times slower than float32 is worth a warning (a CPU with bf16 units is faster)
BF16_SLOW_RATIO = 2.0
FP16 = ("16", "16-mixed", "16-true")

_THIS_MACHINE: contextvars.ContextVar[bool] = contextvars.ContextVar("xcit_ssl_preflight_this_machine", default=True)


@contextlib.contextmanager
def planning() -> Iterator[None]:
    """Within it, :func:`check_trainer_config` applies the config's refusals only, not this machine's."""
    token = _THIS_MACHINE.set(False)
    try:
        yield
    finally:
        _THIS_MACHINE.reset(token)


def strategy_name(trainer: dict[str, Any]) -> str:
    """The trainer's strategy as written: a registry name (``fsdp``), a class path, or a class name.

    jsonargparse gives a string, a nested ``class_path`` namespace, or (after ``dict()`` of a
    namespace) flattened ``strategy.class_path`` keys; a Python caller may pass an instance.
    """
    value = trainer.get("strategy")
    if value is None:
        value = trainer.get("strategy.class_path")
    if value is None or isinstance(value, str):
        return str(value or "auto")
    class_path = value.get("class_path") if isinstance(value, dict) else getattr(value, "class_path", None)
    return str(class_path) if class_path else type(value).__name__


def is_fsdp(strategy: str) -> bool:
    """Lightning's FSDP spellings: ``fsdp``, ``fsdp_cpu_offload`` (the registry's names), ``FSDPStrategy``
    or its class path (``lightning.pytorch.strategies.FSDPStrategy``)."""
    return strategy.lower().startswith("fsdp") or strategy.rsplit(".", 1)[-1] == "FSDPStrategy"


@functools.lru_cache(maxsize=1)
def bf16_slowdown() -> float:
    """How many times slower a bfloat16 linear layer runs than a float32 one on this CPU (measured once).

    A [512, 128] x [128, 128] product, the size of a small model's layers: the best of 3 runs of
    each dtype after one warm-up, ~10 ms where bf16 is emulated (a large GEMM would take seconds
    there: the fallback gets slower per FLOP as matrices grow).
    """
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 128, generator=gen), torch.randn(128, 128, generator=gen)

    def best(dtype: torch.dtype) -> float:
        a, b = x.to(dtype), w.to(dtype)
        torch.nn.functional.linear(a, b)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            torch.nn.functional.linear(a, b)
            times.append(time.perf_counter() - start)
        return max(min(times), 1e-7)

    return best(torch.bfloat16) / best(torch.float32)


def bf16_is_slow_here() -> bool:
    """Whether bfloat16 runs at least :data:`BF16_SLOW_RATIO` times slower than float32 on this CPU."""
    return bf16_slowdown() >= BF16_SLOW_RATIO


def precision_warnings(precision: str, accelerator: str) -> list[str]:
    """Warnings (not refusals) about ``precision`` on ``accelerator`` (Lightning's name) on this machine."""
    if accelerator != "cpu" or not str(precision).startswith("bf16") or not bf16_is_slow_here():
        return []
    return [
        f"--trainer.precision {precision} on this CPU: a bfloat16 matrix product runs {bf16_slowdown():.0f}x "
        "slower than a float32 one here (no bf16 units: PyTorch emulates them), so the run would be many "
        "times slower than in float32; pass --trainer.precision 32-true"
    ]


def _check_this_machine(trainer: dict[str, Any], accelerator: str, precision: str) -> None:
    """Refusals about this machine's hardware: a GPU or device count it lacks, bf16 its GPU lacks."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        raise UserError(
            f"--trainer.accelerator {trainer.get('accelerator')}: no CUDA GPU is visible here; pass "
            "--trainer.accelerator cpu (or auto)"
        )
    available = available_devices(accelerator)
    requested = requested_devices(trainer.get("devices"), available)
    num_nodes = int(trainer.get("num_nodes") or 1)
    if requested is not None and requested > available and not (accelerator == "cpu" and num_nodes > 1):
        what = "GPUs" if accelerator == "gpu" else "CPU cores"
        raise UserError(
            f"--trainer.devices {trainer.get('devices')}: this machine has {available} {what}; pass "
            f"--trainer.devices {available} or fewer"
        )
    if accelerator == "gpu" and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"--trainer.precision {precision}: this GPU has no bfloat16 support; pass --trainer.precision "
            "16-mixed (with a grad scaler) or 32-true"
        )


def _check_config(trainer: dict[str, Any], accelerator: str, precision: str) -> None:
    """Refusals about the config: settings that cannot run on the accelerator it resolves to."""
    strategy = strategy_name(trainer)
    if is_fsdp(strategy) and accelerator != "gpu":
        raise UserError(
            f"--trainer.strategy {strategy} on {accelerator}: FSDP shards the model over CUDA GPUs and needs "
            "--trainer.accelerator gpu on a machine with CUDA GPUs. On this accelerator pass "
            "--trainer.strategy ddp (or auto)"
        )
    available = available_devices(accelerator)
    requested = requested_devices(trainer.get("devices"), max(1, available))
    world = (requested or 1) * int(trainer.get("num_nodes") or 1)
    # one DDP process initialises torch.distributed too, and SyncBatchNorm then refuses CPU tensors
    distributed = world > 1 or str(strategy).lower().startswith("ddp")
    if accelerator == "cpu" and distributed and trainer.get("sync_batchnorm"):
        raise UserError(
            f"--trainer.devices {trainer.get('devices')} (--trainer.strategy {strategy}) on CPU with SyncBatchNorm: "
            "PyTorch's SyncBatchNorm only "
            "runs on GPUs. Pass --trainer.sync_batchnorm false (each CPU process keeps its own BatchNorm "
            "statistics), or run on GPUs"
        )
    if accelerator == "cpu" and precision in FP16:
        fix = (
            f"32-true (not bf16-mixed: bfloat16 matrix products run {bf16_slowdown():.0f}x slower than float32 on this CPU)"
            if bf16_is_slow_here()
            else "bf16-mixed or 32-true"
        )
        raise UserError(f"--trainer.precision {precision}: float16 is not supported on CPU; pass --trainer.precision {fix}")


def check_trainer_config(trainer: dict[str, Any]) -> None:
    """Raise :class:`UserError` for device, strategy, precision and SyncBatchNorm settings that cannot run.

    ``fit`` calls it before anything starts: every refusal applies, and a bf16 run on a CPU where
    bfloat16 is slow is warned about (on the launching rank only). Inside :func:`planning` only
    the config's refusals apply (see the module docstring).
    """
    this_machine = _THIS_MACHINE.get()
    written = str(trainer.get("accelerator") or "auto").lower()
    accelerator = lightning_accelerator(written, "--trainer.accelerator")
    precision = str(trainer.get("precision") or "32-true")
    if this_machine:
        _check_this_machine(trainer, accelerator, precision)
    if this_machine or written != "auto":  # `auto` is this machine's accelerator: no config refusal
        _check_config(trainer, accelerator, precision)
    if this_machine and _launching_rank():
        for message in precision_warnings(precision, accelerator):
            logger.warning(message)


def _launching_rank() -> bool:
    """Rank 0 of a launch (Lightning's DDP launcher re-runs the command for the other ranks)."""
    from .folders import launcher_rank

    return launcher_rank() == 0
