#!/usr/bin/env bash
# The prepared GPU check of issue #11, for one H100/H200 with 16 host cores; under 8 minutes.
# Measures, for dino_small_p16 at bf16: the DINO step (eager and compiled) in img/s with MFU from the
# counted FLOPs and peak memory; the data pipeline in img/s with the host's workers on ImageNet-sized
# JPEGs it writes (per-image vs split path); the batched photometric half on the GPU, eager vs
# compiled (photometric_compile); a 50-step `xcit-ssl fit` end to end, and whether it is
# data-bound or compute-bound. Results: $OUT (or ./gpu_check_out) as JSON + the console log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}; mkdir -p "$OUT"
bash scripts/setup.sh
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. the step alone, eager then compiled (the warm-up steps compile)
$PY benchmarks/bench_dino.py --device cuda --preset small_p16 --precision bf16-mixed --steps 20 --warmup 3 --repeats 1 --json "$OUT/step_eager.json"
timeout 240 $PY benchmarks/bench_dino.py --device cuda --preset small_p16 --precision bf16-mixed --steps 20 --warmup 5 --repeats 1 --compile --json "$OUT/step_compiled.json" || echo "compiled step: timed out or failed" | tee -a "$OUT/notes.txt"
# 2. ImageNet-sized JPEGs (1,600 images, 16 classes) and the data pipeline with 14 workers
$PY - "$OUT" <<'PYEOF'
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "benchmarks")
from bench_data import write_imagenet_like
from xcit_ssl.data.datasets import FashionMNIST, ImageFolderDataset
from xcit_ssl.data.resumable import default_sampler, resumable_loader
from xcit_ssl.data.transforms import MultiCropTransform
out = Path(sys.argv[1]); root = Path("/tmp/gpu_check_data")
if not (root / "train").exists():
    write_imagenet_like(root, FashionMNIST("/usr/share/datasets/fashion-mnist", train=True), 1600, (500, 375))
ds = ImageFolderDataset(root, "train")
rates = {}
for mode in ("per_image", "device"):
    data = ds.with_transform(MultiCropTransform(photometric=mode))
    loader = resumable_loader(data, default_sampler(data, 1, 0), batch_size=64, num_workers=14, pin_memory=True,
                              persistent_workers=False, drop_last=True)
    it = iter(loader); next(it); start, n = time.perf_counter(), 0
    for views, _ in it:
        n += views[0].shape[0]
    rates[mode] = round(n / (time.perf_counter() - start), 1)
(out / "data.json").write_text(json.dumps({"img_per_s_14_workers": rates}, indent=2)); print(rates)
PYEOF
# 2b. the batched photometric half on the GPU, per batch of 64 (2x224 + 10x96): eager vs compiled
timeout 180 $PY - "$OUT" <<'PYEOF' || echo "photometric on the GPU: timed out or failed" | tee -a "$OUT/notes.txt"
import json, sys, time
from pathlib import Path
import torch
from xcit_ssl.data.gpu_augment import augment_views, device_augmentations
from xcit_ssl.data.transforms import MultiCropTransform
views = [torch.randint(0, 256, (64, 3, s, s), dtype=torch.uint8, device="cuda") for s in [224] * 2 + [96] * 10]
result = {}
for name, compile_ in (("eager", False), ("compiled", True)):
    aug = device_augmentations(MultiCropTransform(n_local_crops=10, photometric="device", photometric_compile=compile_)).cuda()
    start = time.perf_counter(); augment_views(views, aug); torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(3): augment_views(views, aug)
    torch.cuda.synchronize(); start = time.perf_counter()
    for _ in range(20): augment_views(views, aug)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - start) / 20 * 1000
    result[name] = {"ms_per_batch_of_64": round(ms, 2), "img_per_s": round(64 / ms * 1000, 1), "first_call_s": round(first, 1)}
(Path(sys.argv[1]) / "photometric_gpu.json").write_text(json.dumps(result, indent=2)); print(result)
PYEOF
mkdir -p /tmp/gpu_check_data/val && cp -r /tmp/gpu_check_data/train/c0 /tmp/gpu_check_data/val/ 2>/dev/null || true
# 3. 50 steps of the real recipe end to end (start to exit), batch 64 on one GPU
start=$(date +%s.%N)
.venv/bin/xcit-ssl fit --recipe dino_small_p16 --data.root /tmp/gpu_check_data --trainer.devices 1 \
  --trainer.max_steps 50 --data.num_workers 14 --run_dir "$OUT/fit" --trainer.callbacks '[]' 2>&1 | tail -5 | tee "$OUT/fit_tail.txt"
end=$(date +%s.%N)
$PY - "$OUT" "$start" "$end" <<'PYEOF'
import json, sys
from pathlib import Path
out, start, end = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
fit = 50 * 64 / (end - start)
step = json.loads((out / "step_eager.json").read_text())["lightning_img_per_s"]
data = json.loads((out / "data.json").read_text())["img_per_s_14_workers"]["device"]
verdict = "data-bound" if data < step else "compute-bound"
summary = {"fit_img_per_s_start_to_exit": round(fit, 1), "step_only_img_per_s": step, "data_img_per_s": data,
           "verdict": verdict, "fit_over_step": round(fit / step, 3)}
(out / "summary.json").write_text(json.dumps(summary, indent=2)); print(json.dumps(summary, indent=2))
PYEOF
