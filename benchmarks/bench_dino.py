"""DINO training-step throughput: our Lightning module vs a bare PyTorch loop doing the same step.

Both paths train the same network on the same in-memory multi-crop batches (data loading is
measured separately in bench_data.py): teacher forward on the global views, student forward per
resolution group, DINO loss, backward, per-parameter clipping, AdamW with scheduled lr/wd, EMA
teacher update and center update. Repeats are interleaved so that machine noise hits both.

    python benchmarks/bench_dino.py                       # the demo recipe's model/crops on CPU
    python benchmarks/bench_dino.py --device cuda --preset small_p16 --precision bf16-mixed

Reports images/s, the ratio Lightning / bare, peak memory (CUDA) and, with --device cuda, the
model FLOP utilisation from the backbone's counted multiply-adds.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import lightning as L
import torch

from xcit_ssl.config import DINOConfig, OptimConfig
from xcit_ssl.methods.dino import DINO
from xcit_ssl.methods.optim import apply_schedules, clip_gradients_per_parameter
from xcit_ssl.models import build_backbone

PRESETS = {
    # name: backbone (a variant, or a variant and build_backbone's overrides), global size, local
    # size, n_local, batch, head (K, hidden, bottleneck)
    "demo": (("xcit_nano_12_p8_224", {"depth": 3, "img_size": 32}), 32, 16, 2, 64, (4096, 512, 128)),  # dino_nano_fmnist
    "demo12": ("xcit_nano_12_p8_224", 32, 16, 2, 64, (4096, 512, 128)),  # the 12-block demo of 2026-12-01
    # issue #32's token grid: the same patch-8 network on Fashion-MNIST upsampled to 64 px (8 x 8 tokens)
    "demo64": (("xcit_nano_12_p8_224", {"depth": 3, "img_size": 64}), 64, 32, 2, 64, (4096, 512, 128)),
    "demo48": (("xcit_nano_12_p8_224", {"depth": 3, "img_size": 48}), 48, 24, 2, 64, (4096, 512, 128)),
    "small_p16": ("xcit_small_12_p16_224", 224, 96, 8, 64, (65536, 2048, 256)),
    "small_p8": ("xcit_small_12_p8_224", 224, 96, 8, 32, (65536, 2048, 256)),
}


def make_batches(preset: tuple, n: int, device: torch.device) -> list:
    _, g, l, n_local, batch, _ = preset
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        views = [torch.randn(batch, 3, g, g, generator=gen) for _ in range(2)]
        views += [torch.randn(batch, 3, l, l, generator=gen) for _ in range(n_local)]
        out.append(([v.to(device) for v in views], torch.zeros(batch, dtype=torch.long, device=device)))
    return out


COMPILE = False  # --compile: both paths run torch.compile'd backbones


def make_model(preset: tuple) -> DINO:
    name, *_, (k, hidden, bottleneck) = preset
    torch.manual_seed(0)
    dino = DINOConfig(out_dim=k, hidden_dim=hidden, bottleneck_dim=bottleneck, momentum_teacher=0.996)
    name, overrides = name if isinstance(name, tuple) else (name, {})
    model = DINO(build_backbone(name, **overrides), dino=dino, optim=OptimConfig(warmup_epochs=0, freeze_last_layer=0))
    if COMPILE:
        from xcit_ssl.methods.compiling import compile_backbones

        compile_backbones({"student_backbone": model.student_backbone, "teacher_backbone": model.teacher_backbone})
    return model


class _PrebuiltBatches(torch.utils.data.Dataset):
    """Hands out whole prebuilt batches through ``__getitems__``: no collate cost in the Lightning path."""

    def __init__(self, batches: list, batch_size: int) -> None:
        self.batches, self.batch_size = batches, batch_size

    def __len__(self) -> int:
        return len(self.batches) * self.batch_size

    def __getitems__(self, indices: list[int]) -> tuple:
        return self.batches[indices[0] // self.batch_size]


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._t = warmup, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        _sync(pl_module.device)
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        _sync(pl_module.device)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_lightning(preset: tuple, batches: list, warmup: int, device: str, precision: str) -> list[float]:
    model = make_model(preset)
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
        accelerator=device, devices=1, precision=precision, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        log_every_n_steps=50,
    )  # fmt: skip
    batch = preset[4]
    loader = torch.utils.data.DataLoader(_PrebuiltBatches(batches, batch), batch_size=batch, collate_fn=lambda b: b)
    trainer.fit(model, loader)
    return timer.times


def run_bare(preset: tuple, batches: list, warmup: int, device: str, precision: str) -> list[float]:
    """The same DINO step without Lightning: the reference a framework must not slow down."""
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    model = make_model(preset).to(dev)
    model.train()
    params = [p for p in list(model.student_backbone.parameters()) + list(model.student_head.parameters())
              if p.requires_grad]  # fmt: skip
    regularised = [p for p in params if p.ndim > 1]
    others = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": regularised}, {"params": others, "regularised": False}], lr=1e-4)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()
    times = []
    for i, (views, _) in enumerate(batches):
        _sync(dev)
        t = time.perf_counter()
        with autocast:
            teacher_out = model.teacher_forward(views[:2])
            student_out = model.student_forward(views)
            loss = model.loss_fn(student_out, teacher_out, 0.04)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients_per_parameter(params, 3.0)
        apply_schedules(opt, lr=1e-4, weight_decay=0.04, freeze_active=False)
        opt.step()
        model.update_teacher(0.996)
        model.loss_fn.update_center(teacher_out.float())
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def _preset_and_batches(args: argparse.Namespace) -> tuple[tuple, torch.device, list]:
    preset = PRESETS[args.preset]
    if args.batch:
        preset = preset[:4] + (args.batch,) + preset[5:]
    dev = torch.device("cuda" if args.device == "cuda" else "cpu")
    return preset, dev, make_batches(preset, args.warmup + args.steps, dev)


def _print_report(report: dict, path: str | None) -> None:
    print(json.dumps(report, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def compile_vs_eager(args: argparse.Namespace) -> None:
    """The bare loop with eager and with compiled backbones, repeats interleaved; compile time apart."""
    global COMPILE
    preset, _, batches = _preset_and_batches(args)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    first: dict[str, float] = {}
    for _ in range(args.repeats):
        for name in ("eager", "compiled"):
            COMPILE = name == "compiled"
            start = time.perf_counter()
            run = run_bare(preset, batches, args.warmup, args.device, args.precision)
            first.setdefault(name, time.perf_counter() - start - sum(run))  # the warm-up steps (compiling)
            times[name] += run
    batch = preset[4]
    report = {"preset": args.preset, "device": args.device, "precision": args.precision, "batch": batch,
              "threads": torch.get_num_threads()}  # fmt: skip
    for name, t in times.items():
        report[f"{name}_img_per_s"] = round(batch / sorted(t)[len(t) // 2], 2)
        report[f"{name}_first_run_warmup_s"] = round(first[name], 1)
    report["compiled_over_eager"] = round(report["compiled_img_per_s"] / report["eager_img_per_s"], 3)
    _print_report(report, args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--json", default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbones (warm-up steps compile)")
    parser.add_argument("--compile_vs_eager", action="store_true",
                        help="instead: the bare loop eager and compiled, interleaved in this process (the ratio of issue #11)")  # fmt: skip
    args = parser.parse_args()
    if args.compile_vs_eager:
        compile_vs_eager(args)
        return
    global COMPILE
    COMPILE = args.compile
    preset, dev, batches = _preset_and_batches(args)
    results: dict[str, list[float]] = {"lightning": [], "bare": []}
    peaks: dict[str, int] = {}
    first: dict[str, float] = {}  # set-up and warm-up steps of the first run (compiling, with --compile)
    for _ in range(args.repeats):  # interleaved
        for name, fn in (("bare", run_bare), ("lightning", run_lightning)):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run = fn(preset, batches, args.warmup, args.device, args.precision)
            first.setdefault(name, time.perf_counter() - start - sum(run))
            results[name] += run
            if dev.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated())
    batch = preset[4]
    report = {"preset": args.preset, "device": args.device, "precision": args.precision, "batch": batch, "compile": args.compile,
              "threads": torch.get_num_threads()}  # fmt: skip
    for name, times in results.items():
        median = sorted(times)[len(times) // 2]
        report[f"{name}_img_per_s"] = round(batch / median, 2)
        report[f"{name}_step_s_median"] = round(median, 4)
        if name in peaks:
            report[f"{name}_peak_mem_gib"] = round(peaks[name] / 2**30, 2)
        report[f"{name}_first_run_warmup_s"] = round(first[name], 1)
    report["lightning_over_bare_time"] = round(report["bare_img_per_s"] / report["lightning_img_per_s"], 3)
    if dev.type == "cuda":
        from xcit_ssl.models.flops import count_gflops

        name, g, l, n_local, *_ = preset
        name, overrides = name if isinstance(name, tuple) else (name, {})
        bb = build_backbone(name, **overrides)
        fwd = 2 * count_gflops(bb, g) + n_local * count_gflops(bb, l)  # student multiply-adds per image
        flop_per_img = 2 * (3 * fwd + 2 * count_gflops(bb, g))  # fwd+bwd ~ 3x fwd, teacher fwd; 2 FLOP / MAC
        peak = 989e12  # dense bf16 peak of an H100/H200 SXM; MFU is relative to it
        report["gflop_per_img"] = round(flop_per_img, 1)
        report["mfu_lightning"] = round(report["lightning_img_per_s"] * flop_per_img * 1e9 / peak, 4)
        report["gpu"] = torch.cuda.get_device_name()
    _print_report(report, args.json)


if __name__ == "__main__":
    main()
