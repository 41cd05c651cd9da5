"""Device resolution, once: what ``--device`` / ``--trainer.accelerator`` / ``--trainer.devices`` mean.

Every command and library that places work on a device asks here, so ``auto``, ``gpu`` and
``cuda`` mean the same thing everywhere and a GPU asked for on a machine without one is one clear
error, never a silent fall-back to the CPU.

    lightning_accelerator("auto")     # "gpu" when CUDA is visible, else "cpu" (Lightning's names)
    torch_device("auto")              # torch.device("cuda") or torch.device("cpu")
    device_count({"accelerator": "gpu", "devices": "0,1"})   # ("gpu", 2)
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "gpu", "cuda", "mps")


def lightning_accelerator(name: Any, flag: str = "--device") -> str:
    """Lightning's accelerator name for ``name``: ``auto`` -> ``gpu`` when CUDA is visible, else
    ``cpu``; ``cuda`` -> ``gpu``. Unknown names raise :class:`UserError` naming ``flag``."""
    text = str(name or "auto").lower()
    if text == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if text in ("cuda", "gpu"):
        return "gpu"
    if text in ("cpu", "mps"):
        return text
    raise UserError(f"{flag} {name}: use one of {', '.join(DEVICE_CHOICES)}")


def torch_device(name: Any, flag: str = "--device") -> torch.device:
    """The ``torch.device`` that ``name`` selects; a GPU asked for where none is visible raises
    :class:`UserError` naming ``flag`` (and ``cpu`` as the fix), instead of running elsewhere."""
    accelerator = lightning_accelerator(name, flag)
    if accelerator == "gpu":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name}: no CUDA GPU is visible here; pass {flag} cpu (or auto)")
        return torch.device("cuda")
    if accelerator == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(f"{flag} {name}: MPS is not available here; pass {flag} cpu (or auto)")
    return torch.device(accelerator)


def available_devices(accelerator: str) -> int:
    """How many devices of ``accelerator`` this machine has (CPU: its cores, as Lightning counts)."""
    return torch.cuda.device_count() if accelerator == "gpu" else (os.cpu_count() or 1)


def requested_devices(devices: Any, available: int) -> int | None:
    """How many devices a ``--trainer.devices`` value asks for (``-1``: all ``available``; a list or
    ``"0,1"``: its length); None for ``auto`` or a value Lightning must judge itself."""
    if devices in (None, "auto"):
        return None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text == "-1":
        return available
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.isdigit() else None


def device_count(trainer: dict[str, Any]) -> tuple[str, int]:
    """(accelerator, devices per node) of a trainer config as Lightning resolves it: ``auto`` devices
    are all GPUs, or one process on the CPU."""
    accelerator = lightning_accelerator(trainer.get("accelerator"), "--trainer.accelerator")
    available = available_devices(accelerator)
    requested = requested_devices(trainer.get("devices"), max(1, available))
    if requested is None:
        return accelerator, (max(1, available) if accelerator == "gpu" else 1)
    return accelerator, max(1, requested)


def runnable_accelerator(accelerator: str) -> str:
    """The accelerator this machine runs work planned for ``accelerator`` (Lightning's name) on: the
    same where it is here, else the CPU (a planner measures here what it plans for elsewhere)."""
    if accelerator == "gpu" and not torch.cuda.is_available():
        return "cpu"
    if accelerator == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "cpu"
    return accelerator
