"""Multi-crop cost per image: DINO's own PIL pipeline vs ours per image vs the split path, and
reading WebDataset shards vs the image folder. Images per CPU-second of one core.

Same ImageNet-sized JPEGs for every case (500x375, written by ``bench_data.write_imagenet_like``),
DINO's recipe 2x224 + 8x96, one intra-op thread (a DataLoader worker's share), CPU time of this
process (``time.process_time``: a machine shared with other jobs still gives per-core figures).

Cases (every one decodes the JPEG):
  dino_reference    DINO's ``DataAugmentationDINO`` written here from the published recipe:
                    torchvision v1 transforms on PIL (RandomResizedCrop bicubic, flip, ColorJitter
                    0.4/0.4/0.2/0.1 p 0.8, grayscale p 0.2, PIL Gaussian blur radius U(0.1, 2)
                    p 1.0/0.1/0.5, solarize p 0.2 on view 2, ToTensor, Normalize)
  per_image         ``MultiCropTransform(photometric="per_image")`` (everything in the worker)
  split_cpu_side    ``MultiCropTransform(photometric="device")``: what the workers do in the
                    split path (decode, crop, resize, flip; uint8 views)
  split_all_on_cpu  split_cpu_side + the batched photometric half run on the CPU in the same
                    process (batches of 32), i.e. the whole new path on a CPU-only machine
  split_all_on_cpu_compiled   the same with ``photometric_compile=True`` (the fused graphs of
                    ``gpu_augment.fused_apply``; compiled in a warm-up pass before timing, the
                    compile time reported apart)
  read_folder / read_shards   decode only, from the folder / from WebDataset shards of it

``--ops`` instead times each batched photometric operation alone (ms per view, batches of 32, one
thread), with the blur both as shipped eagerly (depthwise convolutions) and as ``size`` shifted
multiply-adds per pass (the kernels the compiled path uses, run eagerly here).

    .venv/bin/python benchmarks/bench_multicrop.py [--images 64] [--repeats 3] [--json out.json]
    .venv/bin/python benchmarks/bench_multicrop.py --ops
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import write_imagenet_like  # noqa: E402

from xcit_ssl.data.datasets import FashionMNIST, ImageFolderDataset  # noqa: E402
from xcit_ssl.data.gpu_augment import augment_views, device_augmentations  # noqa: E402
from xcit_ssl.data.shards import WebDatasetShards  # noqa: E402
from xcit_ssl.data.transforms import MultiCropTransform  # noqa: E402


class _Blur:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _Solarize:
    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img) if random.random() < self.p else img


def dino_reference(n_local: int = 8) -> object:
    """DINO's published multi-crop recipe with torchvision v1 transforms on PIL images."""
    flip_jitter = T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ])  # fmt: skip
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bicubic = T.InterpolationMode.BICUBIC
    g1 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic), flip_jitter, _Blur(1.0), normalize])
    g2 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic), flip_jitter, _Blur(0.1),
                    _Solarize(0.2), normalize])  # fmt: skip
    local = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic), flip_jitter, _Blur(0.5), normalize])

    def apply(img: Image.Image) -> list[torch.Tensor]:
        return [g1(img), g2(img)] + [local(img) for _ in range(n_local)]

    return apply


def blur_shift_add(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """The blur as ``size`` shifted multiply-adds per pass (the kernels of the compiled path), eagerly."""
    from xcit_ssl.data import gpu_augment as ga

    half = size // 2
    taps = ga.blur_taps(sigma, size, x.dtype)
    return ga.blur_columns(ga.blur_rows(torch.nn.functional.pad(x, (half,) * 4, mode="reflect"), taps), taps)


def time_ops(batch: int = 32, repeats: int = 5) -> dict:
    """Milliseconds per view of each batched photometric operation, at 224 and 96 px."""
    from xcit_ssl.data import gpu_augment as ga

    def ms(fn) -> float:  # noqa: ANN001
        fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return round(best / batch * 1000, 3)

    out = {}
    gen = torch.Generator().manual_seed(0)
    for size in (224, 96):
        u = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
        x = u.float()
        aug = ga.BatchedPhotometric(size, blur_prob=1.0, solarize_prob=0.2, color_jitter_prob=1.0)
        p = aug.sample(batch, generator=gen)
        idx = torch.arange(batch)
        ops = {f"jitter_{name}": (lambda k=k: aug._jitter_op(k, x.clone(), p, idx))
               for k, name in enumerate(("brightness", "contrast", "saturation", "hue"))}  # fmt: skip
        ops["grayscale"] = lambda: ga.gray(x).expand(-1, 3, -1, -1).contiguous()
        ops[f"blur_conv (kernel {aug.kernel})"] = lambda: ga.blur(x, p.sigma, aug.kernel)
        ops[f"blur_shift_add (kernel {aug.kernel})"] = lambda: blur_shift_add(x, p.sigma, aug.kernel)
        ops["apply (jitter, grayscale p 0.2, blur, solarize p 0.2)"] = lambda: aug.apply(u, p)
        out[f"{size}px"] = {name: ms(fn) for name, fn in ops.items()}
    return out


def cpu_rate(fn, n: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = max(best, n / (time.process_time() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="a multiple of 32 keeps the compiled case to one batch shape")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--ops", action="store_true", help="time each batched photometric operation instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ops:
        report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                  "ms_per_view": time_ops()}  # fmt: skip
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_imagenet_like(root / "data", FashionMNIST("/usr/share/datasets/fashion-mnist", train=True), args.images, (500, 375))
        folder = ImageFolderDataset(root / "data", "train")
        from xcit_ssl.cli import main as cli

        cli(["shard", "--root", str(root / "data"), "--out", str(root / "wds"), "--shard_size", "16"])
        shards = WebDatasetShards(root / "wds" / "train")
        n = len(folder)
        reference = dino_reference()
        per_image = MultiCropTransform()
        split = MultiCropTransform(photometric="device")
        photometric = device_augmentations(split)
        compiled = device_augmentations(MultiCropTransform(photometric="device", photometric_compile=True))

        def run_split_all(augmentations: torch.nn.ModuleList = photometric) -> None:
            batch: list[list[torch.Tensor]] = []
            for i in range(n):
                batch.append(split(folder[i][0]))
                if len(batch) == 32 or i == n - 1:
                    views = [torch.stack([b[v] for b in batch]) for v in range(len(batch[0]))]
                    augment_views(views, augmentations)
                    batch = []

        start = time.perf_counter()
        run_split_all(compiled)  # warm-up: compiles one graph pair per view size
        compile_s = round(time.perf_counter() - start, 1)

        cases = {
            "dino_reference": lambda: [reference(folder[i][0]) for i in range(n)],
            "per_image": lambda: [per_image(folder[i][0]) for i in range(n)],
            "split_cpu_side": lambda: [split(folder[i][0]) for i in range(n)],
            "split_all_on_cpu": run_split_all,
            "split_all_on_cpu_compiled": lambda: run_split_all(compiled),
            "read_folder": lambda: [folder[i] for i in range(n)],
            "read_shards": lambda: [shards[i] for i in range(n)],
        }
        # the cases interleaved, round after round, best round each: drift on a shared VM hits every case alike
        best = {name: 0.0 for name in cases}
        for _ in range(args.repeats):
            for name, fn in cases.items():
                best[name] = max(best[name], cpu_rate(fn, n, 1))
        rates = {name: round(rate, 1) for name, rate in best.items()}
    ratios = {
        "per_image / dino_reference": rates["per_image"] / rates["dino_reference"],
        "split_cpu_side / dino_reference": rates["split_cpu_side"] / rates["dino_reference"],
        "split_all_on_cpu / dino_reference": rates["split_all_on_cpu"] / rates["dino_reference"],
        "split_all_on_cpu_compiled / dino_reference": rates["split_all_on_cpu_compiled"] / rates["dino_reference"],
        "read_shards / read_folder": rates["read_shards"] / rates["read_folder"],
    }
    report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "images": n, "compile_warmup_s": compile_s, "rates_img_per_cpu_s": rates, "ratios": {k: round(v, 2) for k, v in ratios.items()}}  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
