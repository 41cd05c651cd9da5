"""Peak memory of one training step, per device, and how much the device can hold.

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only: the
allocator's cache and the CUDA context come on top; the capacity subtracts them).

CPU: the process's peak resident set size over the step. Linux keeps it as ``VmHWM`` and resets
it to the current RSS when ``5`` is written to ``/proc/self/clear_refs``; before the reset,
``malloc_trim(0)`` hands glibc's free pages back, so the step starts from its live memory (weights,
gradients, optimizer state, the batch, the libraries). Where that reset is not possible, a thread
samples ``VmRSS`` every millisecond instead (it can miss a very short peak). The trim makes the
next step fault its pages in again, so the step that measures memory is not one that is timed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class CpuMemory:
    """Peak RSS of this process over a step (see the module docstring)."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        self._trim = getattr(libc, "malloc_trim", None)
        self._can_reset = self._reset_hwm()
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0
        self.method = (
            "CPU: peak RSS of the step (VmHWM reset after malloc_trim)"
            if self._can_reset
            else "CPU: peak RSS of the step (VmRSS sampled every ms)"
        )

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            _CLEAR_REFS.write_text("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def rss() -> int:
        kib = _status_kib("VmRSS")
        return 0 if kib is None else kib * 1024

    def start(self) -> int:
        """Begin a measured step; returns the resident memory it starts from."""
        if self._trim is not None:
            self._trim(0)
        if self._can_reset and self._reset_hwm():
            return self.rss()
        self._stop.clear()
        self._sampled = self.rss()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self._sampled

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sampled = max(self._sampled, self.rss())

    def peak(self) -> int:
        """Peak resident bytes since :meth:`start`."""
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
            return max(self._sampled, self.rss())
        kib = _status_kib("VmHWM")
        return 0 if kib is None else kib * 1024

    def capacity(self) -> tuple[int | None, str]:
        available = meminfo_available()
        if available is None:
            return None, "unknown (no /proc/meminfo)"
        rss = self.rss()
        return int(0.95 * (available + rss)), "95 % of (MemAvailable + this process's RSS)"


class CudaMemory:
    """Peak allocated tensor memory over a step on one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = f"CUDA: torch.cuda.max_memory_allocated on {torch.cuda.get_device_name(device)}"

    def start(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def capacity(self) -> tuple[int | None, str]:
        free, total = torch.cuda.mem_get_info(self.device)
        held = torch.cuda.memory_reserved(self.device)
        return int(free + held - 0.05 * total), "free + PyTorch-reserved device memory, less 5 % of the total"


def memory_probe(device: torch.device) -> CpuMemory | CudaMemory:
    return CudaMemory(device) if device.type == "cuda" else CpuMemory()
