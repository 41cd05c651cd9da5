"""Rates, run time, batch advice and warnings: each warning names the setting to change.

Pure functions of the plan, the cost, the data report and the measured step model, so that each
rule can be tested on a constructed case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .data_check import DataReport, workers_needed
from .measure import StepModel
from .plan import RunPlan

FP16 = ("16", "16-mixed", "16-true")
BATCH_RATIO = 2.0  # a global batch this far (either way) from the recipe's gets a warning


@dataclass
class Finding:
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass
class Rates:
    """Images/s per device: the model's step, the loader, and what a run would see."""

    compute: float | None
    data: float | None
    expected: float | None
    bound: str | None  # "data" | "compute"
    note: str


def rates(plan: RunPlan, model: StepModel | None, data: DataReport | None) -> Rates:
    compute = data_rate = None
    if model is not None and model.samples:
        compute = plan.batch_size / max(1e-12, step_seconds(model, plan.batch_size))
    if data is not None and data.images_per_s:
        data_rate = data.images_per_s
        per_node = max(1, plan.devices)
        if per_node > 1 and data.per_core:  # the host's cores are shared by every device's workers
            data_rate = data.per_core * min(max(1, data.workers), max(1, data.cores // per_node))
    if compute is None or data_rate is None:
        return Rates(compute, data_rate, compute if data_rate is None else data_rate, None, "")
    threads = torch.get_num_threads()
    if plan.accelerator == "cpu" and data is not None and threads + data.workers > data.cores:
        # the loader's workers and the model's threads share the same cores: the times add up
        expected = 1.0 / (1.0 / compute + 1.0 / data_rate)
        note = (
            f"CPU: {threads} compute threads + {data.workers} workers share {data.cores} cores, so about "
            "1 / (1/compute + 1/data)"
        )
    else:
        expected = min(compute, data_rate)
        note = "the slower of the two (the loader runs ahead in its workers)"
    bound = "data" if data_rate < compute else "compute"
    return Rates(compute, data_rate, expected, bound, note)


def step_seconds(model: StepModel, batch: int) -> float:
    """A micro-step's time at ``batch``: measured when that batch was run, else the linear fit."""
    sample = model.measured(batch)
    return sample.time if sample is not None else model.step_time(batch)


def step_peak(model: StepModel, batch: int) -> float:
    sample = model.measured(batch)
    return float(sample.peak_bytes) if sample is not None else model.peak_memory(batch)


def reach_batch(plan: RunPlan, target: int, max_fit: int | None) -> str | None:
    """Flags that reach global batch ``target`` on the configured devices, within ``max_fit``."""
    world = plan.world
    per_device = math.ceil(target / world)
    note = ""
    if per_device * world != target:
        note = f" (global {per_device * world}: {target} is not a multiple of {world} devices)"
    if max_fit is None or per_device <= max_fit:
        if per_device == plan.batch_size and plan.accumulate == 1:
            return None
        return f"--data.batch_size {per_device} --trainer.accumulate_grad_batches 1{note}"
    if max_fit < 1:
        return None
    for k in range(math.ceil(per_device / max_fit), per_device + 1):
        if per_device % k == 0 and per_device // k <= max_fit:
            return f"--data.batch_size {per_device // k} --trainer.accumulate_grad_batches {k}{note}"
    return None


def findings(
    plan: RunPlan, data: DataReport | None, model: StepModel | None, speed: Rates, max_fit: int | None,
    checkpoint_fit: int | None = None,
) -> list[Finding]:  # fmt: skip
    """Every warning that applies, each naming the flag or setting that fixes it."""
    out: list[Finding] = []
    if plan.precision in FP16 and plan.patch_size == 8:
        out.append(Finding(
            "fp16_patch8",
            f"--trainer.precision {plan.precision} with 8x8 patches is a known NaN source (fp16 overflows in XCiT "
            "p8 training); use --trainer.precision bf16-mixed (no grad scaler needed)",
        ))  # fmt: skip
    g, ref = plan.global_batch, plan.reference_batch
    if ref and (g >= BATCH_RATIO * ref or g * BATCH_RATIO <= ref):
        lr, lr_ref = plan.peak_lr, plan.lr_at(ref)
        fix = reach_batch(plan, ref, max_fit)
        text = (
            f"global batch {g} ({plan.batch_size} x {plan.world} devices x {plan.accumulate}) is {g / ref:.3g}x the "
            f"recipe's {ref}"
        )
        if lr is not None and lr_ref is not None:
            text += (
                f": peak lr {lr:.3g} (base_lr {plan.base_lr:.3g} x {g}/{plan.lr_per}) instead of {lr_ref:.3g}, and "
                "linear lr scaling is approximate that far from the tuned batch"
            )
        if plan.method == "dino" and g < ref:
            text += "; a small batch also wants a slower teacher (DINO: --model.dino.momentum_teacher 0.9995 at 256)"
        text += f". To reach {ref}: {fix}" if fix else f". To reach {ref}: more devices or --trainer.accumulate_grad_batches"
        out.append(Finding("global_batch", text))
    if plan.world > 1 and not plan.sync_batchnorm and plan.method == "dino":
        fix = (
            "pass --trainer.sync_batchnorm true"
            if plan.accelerator == "gpu"
            else "PyTorch's SyncBatchNorm runs only on GPUs, so on CPU each process keeps its own statistics"
        )
        out.append(Finding(
            "sync_batchnorm",
            f"sync_batchnorm is off with {plan.world} processes: the BatchNorm layers (conv stem, LPI) normalise "
            f"over {plan.batch_size} images per device instead of the global batch; {fix}",
        ))  # fmt: skip
    if data is not None:
        out += _data_findings(plan, data, speed)
    epochs = plan.run_epochs
    for name, value in plan.warmups.items():
        short = epochs <= value if name == "optim.freeze_last_layer" else epochs < value
        if value > 0 and short:
            what = {
                "optim.freeze_last_layer": "the DINO head's last layer stays frozen for the whole run",
                "dino.warmup_teacher_temp_epochs": "the teacher temperature never reaches dino.teacher_temp",
            }.get(name, "the lr never finishes its warm-up, so it never reaches its peak")
            out.append(Finding(
                "warmup",
                f"the run is {epochs:.3g} epochs long ({plan.total_steps} steps of {plan.steps_per_epoch} per epoch) "
                f"but {name} is {value:g}: {what}. Lower --model.{name} below {epochs:.3g} or raise "
                f"--trainer.max_epochs above {value:g}",
            ))  # fmt: skip
    if model is not None and model.samples and model.capacity_bytes is not None:
        peak = step_peak(model, plan.batch_size)
        if peak > model.capacity_bytes:
            fix = reach_batch(plan, plan.global_batch, max_fit)
            ckpt = (
                f"; with gradient checkpointing about {checkpoint_fit} images fit per device"
                if checkpoint_fit
                else ""
            )
            out.append(Finding(
                "oom",
                f"out of memory predicted: a step of {plan.batch_size} images needs {_gib(peak)} per device, "
                f"the device holds {_gib(model.capacity_bytes)} (largest batch that fits: {max_fit}). "
                f"Keep the global batch with {fix or 'a smaller --data.batch_size and more accumulation'}{ckpt}",
            ))  # fmt: skip
    return out


def _data_findings(plan: RunPlan, data: DataReport, speed: Rates) -> list[Finding]:
    out: list[Finding] = []
    if data.status == "missing":
        out.append(Finding("data_missing", f"the data folder {data.root} does not exist: {data.message}"))
    elif data.status == "empty":
        out.append(Finding("data_empty", f"the data folder {data.root} holds no training images: {data.message}"))
    elif data.status == "unreadable":
        out.append(Finding(
            "data_unreadable",
            f"{data.message}; find them with `python -c \"from PIL import Image; Image.open(PATH).convert('RGB')\"` "
            "and re-copy or delete them",
        ))  # fmt: skip
    elif data.status == "error":
        out.append(Finding("data_error", data.message))
    if speed.compute and speed.data and speed.data < 0.95 * speed.compute:
        need = workers_needed(data, speed.compute)
        per_device = max(1, data.cores // max(1, plan.devices))
        text = (
            f"the loader gives {speed.data:.3g} img/s per device with {data.workers} workers, the model takes "
            f"{speed.compute:.3g} img/s: data-bound by {speed.compute / speed.data:.2f}x"
        )
        if need is not None and need <= per_device:
            text += f"; pass --data.num_workers {need}"
        elif need is not None:
            text += (
                f"; feeding it takes about {need} worker cores per device, this host has {data.cores} cores for "
                f"{plan.devices} device(s): use --data.num_workers {per_device}, a host with more cores per device, "
                "or cheaper augmentation (fewer/smaller local crops)"
            )
        out.append(Finding("workers", text))
    return out


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_time(plan: RunPlan, speed: Rates) -> dict[str, Any]:
    """Wall time and device-hours of the whole run at the expected per-device rate."""
    rate = speed.expected
    if not rate:
        return {}
    images = plan.total_steps * plan.global_batch
    seconds = images / (rate * plan.world)
    unit = "GPU-hours" if plan.accelerator == "gpu" else "device-hours"
    return {
        "seconds": seconds,
        "hours": seconds / 3600,
        "device_hours": seconds / 3600 * plan.world,
        "unit": unit,
        "images": images,
        "step_seconds": plan.global_batch / (rate * plan.world),
    }
