"""The demo's CPU hot spots, before and after their fixes, interleaved in one process.

Three fixes of 2026-12-02 (session 8), each timed against the code it replaced, re-created here:

1. **XCA's normalisation.** ``F.normalize`` of q and k along the token axis on the permuted
   (strided) view of the qkv projection, against one copy to a contiguous layout first (what
   ``XCA.forward`` does now); forward + backward of the attention core.
2. **Per-sample seeding.** ``torch.manual_seed`` (also queues a seed for every CUDA device; with
   CUDA uninitialised it captures a traceback each call) with NumPy's/Python's state saved and
   restored, against ``torch.default_generator.manual_seed`` alone (what a worker does now).
3. **The device path's geometry.** The v2 ``Compose([RandomResizedCrop, RandomHorizontalFlip])``
   per view, against ``crop_resize_flip`` (same pixels for the same seed; tested).

Then the whole demo step (``bench_dino.py``'s bare loop, demo preset) with the old and the new
XCA, interleaved repeat by repeat.

    python benchmarks/bench_overheads.py               # ~2 min on a 2-core VM
    python benchmarks/bench_overheads.py --json o.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_dino  # noqa: E402

from xcit_ssl.data.transforms import MultiCropTransform, crop_resize_flip  # noqa: E402
from xcit_ssl.models import xcit_layers  # noqa: E402


def _median_ms(fn, repeats: int, inner: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(times)


def _interleaved(cases: dict, repeats: int, inner: int) -> dict[str, float]:
    """Median ms per call of each case, the cases alternating repeat by repeat."""
    out: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            out[name].append(_median_ms(fn, 1, inner))
    return {name: statistics.median(v) for name, v in out.items()}


def xca_core(b: int, n: int, heads: int, head_dim: int, contiguous: bool):
    x = torch.randn(b, n, 3 * heads * head_dim, requires_grad=True)

    def run() -> None:
        qkv = x.reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 4, 1)
        q, k, v = (qkv.contiguous() if contiguous else qkv).unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        (attn @ v).permute(0, 3, 1, 2).reshape(b, n, heads * head_dim).sum().backward()

    return run


def seeding(old: bool):
    counter = iter(range(10**9))

    def run() -> None:
        seed = next(counter)
        if old:
            py, np_ = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed)
            random.setstate(py)
            np.random.set_state(np_)
        else:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)

    return run


def geometry(old: bool):
    """The four geometric views of one 32-px Fashion-MNIST-sized image (2 x 32 + 2 x 16)."""
    t = MultiCropTransform(32, 16, 2, (0.4, 1.0), (0.1, 0.4), photometric="device")
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)

    def run() -> None:
        if old:
            [t.global_view_1(image), t.global_view_2(image), t.local_view(image), t.local_view(image)]
        else:
            [crop_resize_flip(image, 32, t.global_crop_scale) for _ in range(2)]
            [crop_resize_flip(image, 16, t.local_crop_scale) for _ in range(2)]

    return run


def _strided_xca_forward(self, x):  # the XCA.forward of before the fix
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 4, 1).unbind(0)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1))
    return self.proj_drop(self.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, n, c)))


def demo_step(repeats: int, steps: int) -> dict[str, float]:
    preset = bench_dino.PRESETS["demo"]
    batches = bench_dino.make_batches(preset, steps + 2, torch.device("cpu"))
    new_forward = xcit_layers.XCA.forward
    rates: dict[str, list[float]] = {"strided (before)": [], "contiguous (now)": []}
    for _ in range(repeats):
        for name, forward in (("strided (before)", _strided_xca_forward), ("contiguous (now)", new_forward)):
            xcit_layers.XCA.forward = forward
            try:
                times = bench_dino.run_bare(preset, batches, 2, "cpu", "32-true")
            finally:
                xcit_layers.XCA.forward = new_forward
            rates[name].append(preset[4] / statistics.median(times))
    return {name: round(statistics.median(v), 1) for name, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    report: dict[str, object] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for label, shape in (("demo (64 images x 2 views, 4x4 tokens, 4 heads of 32)", (128, 16, 4, 32)),
                         ("XCiT-S12/16 at 224 (batch 64, 14x14 tokens, 8 heads of 48)", (64, 196, 8, 48))):  # fmt: skip
        ms = _interleaved({"strided": xca_core(*shape, contiguous=False), "contiguous": xca_core(*shape, contiguous=True)},
                          args.repeats, 5)  # fmt: skip
        report[f"XCA core fwd+bwd ms, {label}"] = {**{k: round(v, 2) for k, v in ms.items()},
                                                   "speed-up": round(ms["strided"] / ms["contiguous"], 2)}  # fmt: skip
    torch.set_num_threads(1)  # as in a DataLoader worker
    ms = _interleaved({"before": seeding(True), "now": seeding(False)}, args.repeats, 500)
    report["per-sample seeding ms (1 thread)"] = {**{k: round(v, 4) for k, v in ms.items()}, "speed-up": round(ms["before"] / ms["now"], 1)}
    ms = _interleaved({"v2 compose": geometry(True), "crop_resize_flip": geometry(False)}, args.repeats, 200)
    report["geometry of one 32-px image, 4 views, ms (1 thread)"] = {
        **{k: round(v, 3) for k, v in ms.items()}, "speed-up": round(ms["v2 compose"] / ms["crop_resize_flip"], 2)}  # fmt: skip
    torch.set_num_threads(report["threads"])  # type: ignore[arg-type]
    rates = demo_step(max(2, args.repeats // 2), 8)
    report["demo DINO step, bare loop, img/s"] = {**rates, "speed-up": round(rates["contiguous (now)"] / rates["strided (before)"], 2)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
