"""Real training steps of the configured method on synthetic batches, timed and memory-profiled.

The method module the config builds is trained by a ``lightning.Trainer`` (one device, the
config's accelerator, precision and clipping, no logger or checkpoints) on a batch of the
configured shapes, built once on the device and served again every step: what is timed is the
whole Lightning step (the data module's device-side augmentation for ``photometric: device``,
forward, loss, backward, clipping, optimizer, EMA and center updates), not the workers' data
loading (measured apart, :mod:`.data_check`) and not the host-to-device copy.

Per batch size: ``warmup`` untimed steps (AdamW allocates its moments on the first), ``steps``
timed ones (the fastest counts: on a shared host the others carry other processes' work), then
one step that measures peak memory (:mod:`.memory`). Over two or more
batch sizes, step time and peak memory are fitted as ``a + b x batch`` (least squares): a batch
too large (or too slow) to run here is predicted from smaller ones, and the largest batch that
fits the device is ``(capacity - a) / b``. Under gradient accumulation an optimizer step is taken
as ``accumulate`` micro-steps (the optimizer's own share is counted each time: an upper bound).
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ..console import quiet_loggers
from ..devices import runnable_accelerator, torch_device
from ..runs.preflight import FP16, bf16_slowdown
from .memory import CpuMemory, CudaMemory, memory_probe
from .plan import RunPlan, backbone_of

logger = logging.getLogger(__name__)

# trainer settings that change what a step computes; everything else is the run's bookkeeping
_STEP_SETTINGS = ("precision", "gradient_clip_val", "gradient_clip_algorithm", "deterministic", "benchmark")


@dataclass
class StepSample:
    batch: int
    seconds: list[float]
    peak_bytes: int
    base_bytes: int
    grad_checkpointing: bool = False

    @property
    def time(self) -> float:
        """The fastest timed step: on a shared host the others carry other processes' work."""
        return min(self.seconds)


@dataclass
class StepModel:
    """Measured samples and the linear fits ``time = t0 + t1 b``, ``memory = m0 + m1 b``."""

    device: str
    memory_method: str
    samples: list[StepSample]
    capacity_bytes: int | None
    capacity_note: str
    t0: float = 0.0
    t1: float = 0.0
    m0: float = 0.0
    m1: float = 0.0
    oom_batches: list[int] = field(default_factory=list)

    def step_time(self, batch: int) -> float:
        return self.t0 + self.t1 * batch

    def peak_memory(self, batch: int) -> float:
        return self.m0 + self.m1 * batch

    def measured(self, batch: int) -> StepSample | None:
        return next((s for s in self.samples if s.batch == batch and not s.grad_checkpointing), None)

    def max_batch(self) -> int | None:
        """Largest batch whose predicted peak fits the device (None when unknown)."""
        if self.capacity_bytes is None or self.m1 <= 0:
            return None
        return max(0, int((self.capacity_bytes - self.m0) // self.m1))


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``y = a + b x``; one point gives ``(0, y / x)``."""
    if len(set(xs)) < 2:
        return 0.0, (ys[0] / xs[0] if xs and xs[0] else 0.0)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


class _Repeat:
    """The same prebuilt batch ``n`` times; ``batch_size`` is what the methods read off a loader."""

    def __init__(self, batch: Any, n: int, batch_size: int) -> None:
        self.batch, self.n, self.batch_size = batch, n, batch_size

    def __iter__(self) -> Any:
        return (self.batch for _ in range(self.n))

    def __len__(self) -> int:
        return self.n


def synthetic_batch(
    model: Any, plan: RunPlan, batch: int, device: torch.device, datamodule: Any | None = None
) -> list[Any]:
    """Random inputs of the configured shapes: ``[views, labels]`` (DINO) or ``[images, labels]``;
    ``uint8`` views when the data module augments on the device (``photometric: device``)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    if plan.method == "dino":
        transform = getattr(datamodule, "train_transform", None)
        if getattr(transform, "photometric", "per_image") == "device":
            views = [
                torch.randint(0, 256, (batch, 3, s, s), generator=gen, dtype=torch.uint8).to(device)
                for s, n in plan.crops
                for _ in range(n)
            ]
        else:
            views = [torch.randn(batch, 3, s, s, generator=gen).to(device) for s, n in plan.crops for _ in range(n)]
        return [views, torch.zeros(batch, dtype=torch.long, device=device)]
    size = plan.crops[0][0]
    classes = max(1, int(getattr(backbone_of(model), "num_classes", 1) or 1))
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    return [images, torch.randint(0, classes, (batch,), generator=gen).to(device)]


class _Probe(Callback):
    """Times each step from the end of the previous one: fetch, transfer and the data module's
    device-side augmentation (``on_after_batch_transfer``, run before ``on_train_batch_start``)
    belong to the step as in training. The last step measures memory instead."""

    def __init__(self, memory: CpuMemory | CudaMemory, warmup: int, steps: int) -> None:
        self.memory, self.warmup, self.steps = memory, warmup, steps
        self.seconds: list[float] = []
        self.base = self.peak = 0
        self._last = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        idx = args[-1]
        if self.warmup <= idx < self.warmup + self.steps:
            self.seconds.append(now - self._last)
        if idx == self.warmup + self.steps:
            self.peak = self.memory.peak()
        if idx == self.warmup + self.steps - 1:
            self.base = self.memory.start()
        self._last = time.perf_counter()


class _SyntheticData(L.LightningDataModule):
    """Serves the prebuilt batches and runs the configured data module's after-transfer hook
    (``photometric: device`` augmentation) on them, as ``fit`` does."""

    def __init__(self, batches: _Repeat, inner: Any | None) -> None:
        super().__init__()
        self.batches, self.inner = batches, inner

    def train_dataloader(self) -> Any:
        return self.batches

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        hook = getattr(self.inner, "on_after_batch_transfer", None)
        if hook is None:
            return batch
        saved = self.inner.trainer
        self.inner.trainer = self.trainer
        try:
            return hook(batch, dataloader_idx)
        finally:
            self.inner.trainer = saved


def target_device(plan: RunPlan) -> torch.device:
    """The one device the planner measures on: the run's accelerator (its first GPU) where this
    machine has it, else this machine's CPU (a GPU run planned from a laptop)."""
    return torch_device(runnable_accelerator(plan.accelerator), "--trainer.accelerator")


def measured_elsewhere(plan: RunPlan) -> str:
    """Why measurements here do not describe the planned device ("" when they do)."""
    here = runnable_accelerator(plan.accelerator)
    return "" if here == plan.accelerator else f"measured on {here}, not the planned {plan.accelerator}"


def step_precision(plan: RunPlan) -> str:
    """The precision steps are measured in: the run's, except float16 on a CPU (which ``fit`` refuses
    and only a GPU plan measured here asks for), measured in float32 instead."""
    if target_device(plan).type == "cpu" and plan.precision in FP16:
        return "32-true"
    return plan.precision


def run_steps(
    model: L.LightningModule, plan: RunPlan, trainer_cfg: dict[str, Any], batch: int, steps: int = 3,
    warmup: int = 1, grad_checkpointing: bool = False, datamodule: Any | None = None,
) -> StepSample:  # fmt: skip
    """Train ``model`` for ``warmup + steps + 1`` steps of ``batch`` images on one device (with
    ``datamodule``'s after-transfer augmentation when it has one)."""
    device = target_device(plan)
    memory = memory_probe(device)
    probe = _Probe(memory, warmup, steps)
    data = _Repeat(synthetic_batch(model, plan, batch, device, datamodule), warmup + steps + 1, batch)
    backbone = backbone_of(model)
    if grad_checkpointing and backbone is not None:
        backbone.set_grad_checkpointing(True)
    kwargs = {k: trainer_cfg[k] for k in _STEP_SETTINGS if trainer_cfg.get(k) is not None}
    kwargs.update(precision=step_precision(plan), accelerator=runnable_accelerator(plan.accelerator))
    quiet = quiet_loggers("lightning.pytorch", "lightning.fabric", "xcit_ssl.methods")
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        try:
            trainer = L.Trainer(
                devices=1, num_nodes=1, max_steps=warmup + steps + 1, max_epochs=-1,
                logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=[probe], limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp,
                log_every_n_steps=int(trainer_cfg.get("log_every_n_steps") or 50), **kwargs,
            )  # fmt: skip
            trainer.fit(model, datamodule=_SyntheticData(data, datamodule))
        finally:
            if backbone is not None:
                backbone.set_grad_checkpointing(False)
            model._trainer = None
            del data
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return StepSample(batch, probe.seconds, probe.peak, probe.base, grad_checkpointing)


def _even(n: int) -> int:
    return max(2, n - n % 2)


def measure(
    model: L.LightningModule, plan: RunPlan, trainer_cfg: dict[str, Any], steps: int = 3, warmup: int = 1,
    batches: list[int] | None = None, step_budget_s: float = 4.0, datamodule: Any | None = None,
) -> StepModel:  # fmt: skip
    """Measure at ``batches`` (default: 2, then the largest that runs in ``step_budget_s`` and fits,
    up to the configured batch) and fit the linear models."""
    device = target_device(plan)
    memory = memory_probe(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    result = StepModel(f"{device} ({name})", memory.method, [], None, "")
    target = plan.batch_size
    queue = list(batches) if batches else [min(target, 2)]
    while queue:
        b = queue.pop(0)
        try:
            sample = run_steps(model, plan, trainer_cfg, b, steps, warmup, datamodule=datamodule)
        except torch.cuda.OutOfMemoryError:
            result.oom_batches.append(b)
            if not batches and b > 2:
                queue.append(_even(b // 2))
            continue
        result.samples.append(sample)
        if not batches and len(result.samples) == 1 and target > b:
            per_image = sample.time / b  # an upper bound of the slope: the fixed part is in it
            by_time = int(step_budget_s / max(per_image, 1e-9))
            b2 = max(min(target, 2 * b), min(target, by_time))
            capacity, _ = memory.capacity()
            if capacity is not None and sample.peak_bytes > sample.base_bytes:
                slope = (sample.peak_bytes - sample.base_bytes) / b
                b2 = min(b2, max(b + 1, int((0.85 * capacity - sample.base_bytes) / slope)))
            b2 = min(target, b2 if b2 == target else _even(b2))
            if b2 > b:
                queue.append(b2)
    result.capacity_bytes, result.capacity_note = memory.capacity()
    fit_samples(result)
    return result


def fit_samples(result: StepModel) -> None:
    plain = [s for s in result.samples if not s.grad_checkpointing]
    if not plain:
        return
    xs = [float(s.batch) for s in plain]
    result.t0, result.t1 = fit_line(xs, [s.time for s in plain])
    if len(set(xs)) < 2:  # one batch size: the memory it starts from is the fixed part
        s = plain[0]
        result.m0, result.m1 = float(s.base_bytes), (s.peak_bytes - s.base_bytes) / s.batch
    else:
        result.m0, result.m1 = fit_line(xs, [float(s.peak_bytes) for s in plain])
    if result.t0 < 0 or result.t1 <= 0:  # noise swamped the fit: proportional to the largest batch
        largest = max(plain, key=lambda s: s.batch)
        result.t0, result.t1 = 0.0, largest.time / largest.batch


def timing_spread(result: StepModel) -> float:
    """Slowest / fastest timed step of one batch size, worst over the batch sizes (1 = steady)."""
    spreads = [max(s.seconds) / min(s.seconds) for s in result.samples if len(s.seconds) > 1 and min(s.seconds) > 0]
    return max(spreads, default=1.0)


def checkpointed_slope(
    model: L.LightningModule, plan: RunPlan, trainer_cfg: dict[str, Any], result: StepModel, steps: int = 1,
    datamodule: Any | None = None,
) -> float | None:
    """Peak memory per image with gradient checkpointing, from one run at the largest measured batch."""
    plain = [s for s in result.samples if not s.grad_checkpointing]
    if not plain:
        return None
    b = max(s.batch for s in plain)
    try:
        sample = run_steps(model, plan, trainer_cfg, b, steps, 1, grad_checkpointing=True, datamodule=datamodule)
    except torch.cuda.OutOfMemoryError:
        return None
    result.samples.append(sample)
    return max(0.0, (sample.peak_bytes - result.m0) / b)


# dense peak TFLOP/s per GPU: (bf16/fp16 tensor cores, fp32, tf32 tensor cores); vendor datasheets
PEAK_TFLOPS: dict[str, tuple[float, float, float]] = {
    "H200 NVL": (835.0, 60.0, 418.0),
    "H200": (989.0, 67.0, 494.0),
    "H100 NVL": (835.0, 60.0, 418.0),
    "H100 PCIe": (756.0, 51.0, 378.0),
    "H100": (989.0, 67.0, 494.0),  # SXM
    "A100": (312.0, 19.5, 156.0),
}


def _half_precision(precision: str) -> bool:
    return precision.startswith(("bf16", "16"))


def known_peak(device_name: str, precision: str) -> tuple[float | None, str]:
    """Datasheet peak FLOP/s of a known GPU at this precision, else (None, why)."""
    for key, (half, fp32, tf32) in PEAK_TFLOPS.items():
        if key.lower() in device_name.lower():
            if _half_precision(precision):
                return half * 1e12, f"{key} dense bf16/fp16 datasheet peak"
            if torch.get_float32_matmul_precision() != "highest":
                return tf32 * 1e12, f"{key} dense TF32 datasheet peak"
            return fp32 * 1e12, f"{key} fp32 datasheet peak"
    return None, f"no datasheet peak for {device_name}"


def _gemm_rate(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of square matrix products of ``dtype`` on ``device`` (2 FLOP per multiply-add)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    count, start = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * count / elapsed


def gemm_peak(device: torch.device, precision: str, seconds: float = 0.5) -> tuple[float, str]:
    """The device's peak FLOP/s for MFU, measured with square matrix products, and what was measured.

    In the run's compute dtype, except on a CPU where bfloat16 is slower than float32 (no bf16
    units: PyTorch's fallback, which also gets slower per FLOP as the matrices grow, 0.5 GFLOP/s at
    1024^2 against 2.4 at 64^2 on a 2-core EPYC): there float32 is the CPU's peak, and a bf16 GEMM
    rate taken as the peak put the MFU of a small bf16 model above 100 %.
    """
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else torch.float32
    side, why = (4096 if device.type == "cuda" else 1024), ""
    if device.type == "cpu" and (dtype == torch.float16 or (dtype == torch.bfloat16 and bf16_slowdown() > 1.0)):
        dtype = torch.float32
        why = ": float16 does not run on a CPU" if precision.startswith("16") else (
            ": this CPU runs bfloat16 slower than float32, so float32 is its peak"
        )
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    name = str(dtype).removeprefix("torch.")
    return _gemm_rate(device, dtype, seconds), f"measured {side}^2 {name} GEMM peak here{threads}{why}, no datasheet value"


def compute_rate(device: torch.device, precision: str, seconds: float = 0.2) -> float:
    """FLOP/s the run's matrix products reach at best here: the peak, over the bf16 slowdown of a CPU."""
    peak, _ = gemm_peak(device, precision, seconds)
    if device.type == "cpu" and precision.startswith("bf16"):
        peak /= max(1.0, bf16_slowdown())
    return peak
