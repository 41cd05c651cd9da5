"""Our XCiT against timm's ``Xcit``, and XCiT-S12/16 against ViT-S/16 across resolutions.

    python benchmarks/bench_backbone.py                  # CPU, about 3-5 minutes on 2 cores
    python benchmarks/bench_backbone.py --device cuda    # GPU, bf16 autocast, bigger batches

1. Training step (forward + backward) of the same weights in our ``XCiT`` and timm's ``Xcit``:
   images/s as the ratio ours/timm, peak memory, and the exact bytes autograd saves for
   backward. Repeats are interleaved (ours and timm take turns, alternating who goes first) so
   drift in a shared machine hits both alike; ratios are given as median [quartiles] of the
   per-repeat ratios, on wall-clock and on process CPU time (steadier when the machine is shared).
2. Inference time and memory against resolution for XCiT-S12/16 and timm's ViT-S/16
   (``vit_small_patch16_224``, ``dynamic_img_size=True``), with its fused attention (SDPA) and
   with the explicit softmax(QK^T)V that the XCiT paper compared against.

Memory is the peak of tensor bytes allocated by one step above what the model and input already
hold (a separate, untimed step). CUDA: ``max_memory_allocated``. CPU: the same quantity counted
exactly by :class:`LiveTensorBytes`; unlike the process's resident set it does not depend on
allocator caching or on what ran before (peak-RSS deltas, measured in fresh processes, ranked
the models the same way but wandered by about 0.5 MiB from run to run).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from xcit_ssl.models import create_backbone  # noqa: E402
from xcit_ssl.models.flops import count_gflops  # noqa: E402

TRAIN_VARIANTS = ["xcit_nano_12_p16_224", "xcit_tiny_12_p16_224", "xcit_small_12_p16_224"]
SWEEP_MODELS = ["xcit_small_12_p16", "vit_small_sdpa", "vit_small_explicit"]


# -- models -------------------------------------------------------------------------------------


def build(kind: str, device: str) -> nn.Module:
    """``ours:<variant>``, ``timm:<variant>`` (same seed, same weights), or a sweep model."""
    if kind.startswith(("ours:", "timm:")):
        impl, name = kind.split(":")
        torch.manual_seed(0)
        ours = create_backbone(name, num_classes=1000)
        if impl == "ours":
            return ours.to(device)
        theirs = timm.create_model(name, pretrained=False, num_classes=1000)
        theirs.load_state_dict(ours.state_dict())
        return theirs.to(device)
    if kind == "xcit_small_12_p16":
        return create_backbone("xcit_small_12_p16_224", num_classes=0).to(device)
    if kind.startswith("vit_small"):
        vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
        if kind == "vit_small_explicit":  # materialise the N x N attention, as in the paper's comparison
            for m in vit.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = False
        return vit.to(device)
    raise ValueError(kind)


def step_fn(model: nn.Module, x: torch.Tensor, train: bool, device: str) -> Callable[[], None]:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    if train:
        model.train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with autocast:
                out = model(x)
            out.float().logsumexp(-1).mean().backward()

    else:
        model.eval()

        def step() -> None:
            with torch.no_grad(), autocast:
                model(x)

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- memory ---------------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active and still alive (exact, any device).

    Every op output's storage is counted once (views share it) until Python frees it: storages
    keep their Python object for their whole life, so a weakref finaliser marks the free.
    Storages of ``existing`` tensors (weights, input), which views such as ``weight.t()`` return,
    are never counted.
    """

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = {t.untyped_storage()._cdata for t in existing}

    def _free(self, key: int, nbytes: int) -> None:
        self.tracked.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.tracked:
                    self.tracked.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out


def peak_memory_mib(model: nn.Module, x: torch.Tensor, train: bool, device: str) -> float:
    """Peak memory of one step above what is held before it (after one warm-up step)."""
    step = step_fn(model, x, train, device)
    step()
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with LiveTensorBytes([x, *model.parameters(), *model.buffers()]) as tracker:
        step()
    model.zero_grad(set_to_none=True)
    return tracker.peak / 2**20


# -- time -----------------------------------------------------------------------------------------


def time_steps(step: Callable[[], None], iters: int, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step. CPU time is steadier on a shared machine."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def interleaved_times(
    steps: dict[str, Callable[[], None]], repeats: int, iters: int, device: str
) -> dict[str, list[tuple[float, float]]]:
    """(wall, cpu) seconds per step of each callable, taking turns, alternating who goes first."""
    for step in steps.values():  # warm-up: kernels, allocator, oneDNN primitive caches
        for _ in range(2):
            step()
    names = list(steps)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(time_steps(steps[name], iters, device))
    return times


def ratio_stats(ours: list[float], theirs: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-repeat ratio theirs/ours (> 1: ours faster)."""
    ratios = sorted(t / o for o, t in zip(ours, theirs))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return q[1], q[0], q[2]


def saved_for_backward_mib(model: nn.Module, x: torch.Tensor, device: str) -> float:
    """Bytes of the distinct storages autograd keeps for backward (activations and weights): exact."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=device == "cuda"
    ):
        model(x)
    return sum(storages.values()) / 2**20


# -- the two experiments ---------------------------------------------------------------------------


def bench_train(args: argparse.Namespace) -> list[dict[str, Any]]:
    timings, saved, peaks = {}, {}, {}
    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    for name in args.variants:
        models = {impl: build(f"{impl}:{name}", args.device) for impl in ("ours", "timm")}
        steps = {impl: step_fn(m, x, True, args.device) for impl, m in models.items()}
        timings[name] = interleaved_times(steps, args.repeats, args.iters, args.device)
        saved[name] = {impl: saved_for_backward_mib(m, x, args.device) for impl, m in models.items()}
        peaks[name] = {impl: peak_memory_mib(m, x, True, args.device) for impl, m in models.items()}
        del models, steps
    impls = ("ours", "timm")
    rows = []
    for name, times in timings.items():
        wall = {impl: [t[0] for t in times[impl]] for impl in impls}
        cpu = {impl: [t[1] for t in times[impl]] for impl in impls}
        ours_mib, timm_mib = peaks[name]["ours"], peaks[name]["timm"]
        row = dict(
            variant=name,
            batch=args.batch,
            ours_img_s=args.batch / statistics.median(wall["ours"]),
            timm_img_s=args.batch / statistics.median(wall["timm"]),
            speed_ratio_wall=ratio_stats(wall["ours"], wall["timm"]),
            speed_ratio_cpu=ratio_stats(cpu["ours"], cpu["timm"]),
            ours_peak_mib=ours_mib,
            timm_peak_mib=timm_mib,
            ours_saved_mib=saved[name]["ours"],
            timm_saved_mib=saved[name]["timm"],
        )
        rows.append(row)
        w, c = row["speed_ratio_wall"], row["speed_ratio_cpu"]
        print(
            f"{name:22s} img/s ours {row['ours_img_s']:6.1f} timm {row['timm_img_s']:6.1f} | "
            f"speed ours/timm wall {w[0]:.3f} [{w[1]:.3f}-{w[2]:.3f}] cpu {c[0]:.3f} [{c[1]:.3f}-{c[2]:.3f}] | "
            f"peak MiB ours {ours_mib:6.1f} timm {timm_mib:6.1f} | saved MiB ours "
            f"{row['ours_saved_mib']:.2f} timm {row['timm_saved_mib']:.2f}",
            flush=True,
        )
    return rows


def bench_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = {kind: build(kind, args.device) for kind in SWEEP_MODELS}
    timings, peaks = {}, {}
    for size in args.sizes:
        x = torch.randn(args.sweep_batch, 3, size, size, device=args.device)
        steps = {kind: step_fn(m, x, False, args.device) for kind, m in models.items()}
        timings[size] = interleaved_times(steps, args.repeats, 1, args.device)
        peaks[size] = {kind: peak_memory_mib(m, x, False, args.device) for kind, m in models.items()}
    del models
    with torch.device("meta"):  # multiply-adds as fvcore counts them (SDPA included), free on meta
        meta_models = {kind: build(kind, "meta") for kind in SWEEP_MODELS}
    rows = []
    for size, times in timings.items():
        row: dict[str, Any] = dict(size=size, tokens=(size // 16) ** 2, batch=args.sweep_batch)
        for kind in SWEEP_MODELS:
            row[f"{kind}_gflops"] = count_gflops(meta_models[kind], size)
            row[f"{kind}_ms"] = 1000 * statistics.median(t[0] for t in times[kind]) / args.sweep_batch
            row[f"{kind}_cpu_ms"] = 1000 * statistics.median(t[1] for t in times[kind]) / args.sweep_batch
            row[f"{kind}_mib"] = peaks[size][kind]
        rows.append(row)
        print(
            f"{size:4d}px N={row['tokens']:5d}  "
            + "  ".join(
                f"{k} {row[f'{k}_gflops']:6.2f} GF {row[f'{k}_ms']:7.1f} ms (cpu {row[f'{k}_cpu_ms']:7.1f}) "
                f"{row[f'{k}_mib']:7.1f} MiB"
                for k in SWEEP_MODELS
            ),
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", nargs="+", default=TRAIN_VARIANTS)
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 4 on CPU, 128 on CUDA)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 320, 448, 640])
    parser.add_argument("--sweep-batch", type=int, default=None, help="default 1 on CPU, 32 on CUDA")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 9 CPU, 10 CUDA)")
    parser.add_argument("--iters", type=int, default=None, help="steps per timed repeat (default 1 CPU, 20 CUDA)")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU intra-op threads (default 1: on a shared machine, OpenMP barriers stall whenever another "
        "job holds a core; we measured 20x slower steps with 2 threads at load 6 on 2 cores)",
    )  # fmt: skip
    parser.add_argument("--skip", choices=["train", "sweep"], default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (128 if gpu else 4)
    args.repeats = args.repeats or (10 if gpu else 9)
    args.sweep_batch = args.sweep_batch or (32 if gpu else 1)
    args.iters = args.iters or (20 if gpu else 1)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    machine = (
        torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads"
    )
    print(f"# {date.today()}  {machine}  torch {torch.__version__}  timm {timm.__version__}", flush=True)
    started = time.perf_counter()
    results: dict[str, Any] = dict(date=str(date.today()), machine=machine, torch=torch.__version__, argv=sys.argv)
    if args.skip != "train":
        results["train"] = bench_train(args)
    if args.skip != "sweep":
        results["sweep"] = bench_sweep(args)
    print(f"# total {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
