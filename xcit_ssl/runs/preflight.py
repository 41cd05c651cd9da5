"""Refuse configurations that cannot run, before any process is spawned or folder created.

Lightning finds these out only after it has started ranks (four tracebacks for
``--trainer.devices 4`` with SyncBatchNorm on CPU) or built the trainer; one message that names
the flag to change is better.
"""

from __future__ import annotations

from typing import Any

import torch

from ..devices import available_devices, lightning_accelerator, requested_devices
from ..errors import UserError


def check_trainer_config(trainer: dict[str, Any]) -> None:
    """Raise :class:`UserError` for device, precision and SyncBatchNorm settings that cannot run here."""
    accelerator = lightning_accelerator(trainer.get("accelerator"), "--trainer.accelerator")
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
    world = (requested or 1) * num_nodes
    if accelerator == "cpu" and world > 1 and trainer.get("sync_batchnorm"):
        raise UserError(
            f"--trainer.devices {trainer.get('devices')} on CPU with SyncBatchNorm: PyTorch's SyncBatchNorm only "
            "runs on GPUs. Pass --trainer.sync_batchnorm false (each CPU process keeps its own BatchNorm "
            "statistics), or run on GPUs"
        )
    precision = str(trainer.get("precision") or "32-true")
    if accelerator == "cpu" and precision in ("16", "16-mixed", "16-true"):
        raise UserError(
            f"--trainer.precision {precision}: float16 is not supported on CPU; pass --trainer.precision "
            "bf16-mixed or 32-true"
        )
    if accelerator == "gpu" and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"--trainer.precision {precision}: this GPU has no bfloat16 support; pass --trainer.precision "
            "16-mixed (with a grad scaler) or 32-true"
        )
