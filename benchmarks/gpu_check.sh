#!/usr/bin/env bash
# The GPU check of issue #11: one command, for one H100/H200 with 16 host cores and no network, under
# 8 minutes. It needs nothing from outside: the machine's own python3 (torch, torchvision, Lightning,
# timm: the image's), the xcit-ssl source of this tree on PYTHONPATH, and the wheels the image lacks
# from .whl/ (filled here by scripts/fetch_wheels.sh; the device call carries it), installed with
# `pip install --no-index --no-deps --target` into a fresh folder. No setup.sh, no venv, no registry.
#
#   OUT=dir bash benchmarks/gpu_check.sh              # on the GPU machine (device call: carry .whl)
#   OUT=dir bash benchmarks/gpu_check.sh --rehearse   # here, on the CPU, the same parts at toy sizes
#
# Parts, for dino_small_p16 at bf16-mixed on one GPU: env (interpreter, GPU, carried wheels and their
# needs), the DINO step eager and compiled (bench_dino.py: img/s, MFU, peak memory, set-up and
# compile time), ImageNet-sized JPEGs it writes and the data pipeline with the host's workers, a
# 50-step `xcit-ssl fit` start to exit (data- or compute-bound), `fit` under FSDP (world 1) killed
# with SIGTERM after its first checkpoint and resumed from last.ckpt vs the same steps with
# `--trainer.strategy auto` (final weights' max abs difference), `xcit-ssl knn` feature extraction
# on the JPEG folder, and the batched photometric half on the GPU eager and compiled.
#
# Each part runs under `timeout` inside the check's own budget (GPU_CHECK_BUDGET_S: 450 s, rehearsal 600), is skipped
# when too little is left, and is recorded ok / failed / timed out / skipped in $OUT/parts.json; one
# failure does not stop the others. $OUT gets three files: console.log, parts.json, results.json
# (every part's JSON and a summary), rewritten after each part. Run folders, data and per-part logs
# stay in $GPU_CHECK_WORK (/tmp/gpu_check_work).
#
# --rehearse: device cpu, 32-true, tiny model overrides and image counts; the FSDP part runs with
# `ddp` on one process (Lightning refuses FSDP on a CPU) and says so; torch.compile uses the
# aot_eager backend (benchmarks/gpu_check/rehearsal_site: Inductor's C++ build takes minutes on 2
# cores); python3 is this machine's, in a venv of links to only the .venv packages the GPU image
# also has (benchmarks/gpu_check/rehearsal_python.py). It fetches the wheels first when .whl/ is
# empty (the one network step, before the clock starts). GPU_CHECK_PARTS="env fit ..." runs a subset
# (install always runs; data_write feeds data_pipeline, fit, kill_resume and knn; knn uses fit's
# checkpoint, else a random init); GPU_CHECK_VENV names the environment the rehearsal borrows from.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
MODE=device
[ "${1:-}" = --rehearse ] && MODE=rehearse
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
HELP=benchmarks/gpu_check/parts.py

if ! ls .whl/*.whl >/dev/null 2>&1; then
  if [ "$MODE" = rehearse ]; then
    bash scripts/fetch_wheels.sh || { echo "gpu_check: .whl/ is empty and could not be filled" >&2; exit 3; }
  else
    echo "gpu_check: .whl/ holds no wheels: run 'bash scripts/fetch_wheels.sh' where pip works and carry .whl" >&2
    exit 3
  fi
fi

# from here on nothing is fetched
export PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONUNBUFFERED=1
rm -rf "$WORK" "$OUT/console.log" "$OUT/parts.json" "$OUT/results.json"
mkdir -p "$WORK/json"
exec > >(tee -a "$OUT/console.log") 2>&1
START=$(date +%s)
RESERVE=10   # seconds kept for the last merge
MIN_PART=20  # a part that would get less is skipped

# budgets and sizes: the device's, then the rehearsal's
DATA=$WORK/data
declare -A LIMIT=([install]=60 [env]=60 [step_eager]=120 [data_write]=60 [data_pipeline]=90 [fit]=150
                  [kill_resume]=240 [knn]=90 [step_compiled]=240 [photometric]=150)
if [ "$MODE" = device ]; then
  PY=python3 DEVICE=cuda ACCEL=gpu PRECISION=bf16-mixed STRATEGY=fsdp KR_NOTE="" BUDGET=${GPU_CHECK_BUDGET_S:-450}
  WORKERS=$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))
  STEP=(--preset small_p16 --steps 20 --warmup 3 --repeats 1)
  STEP_COMPILED=(--preset small_p16 --steps 20 --warmup 5 --repeats 1)
  IMAGES=(--train 1600 --val 320 --classes 16)
  PIPE=(--batch 64 --pin_memory)
  PHOTO=(--batch 64 --warmup 3 --iters 20)
  FIT=(--steps 50 --batch 64)
  KR=(--steps 30 --every 10 --batch 32)
  KR_EXTRA=()
  TINY=()
  KNN=(--device cuda --precision bf16-mixed --batch_size 256)
else
  PY="" DEVICE=cpu ACCEL=cpu PRECISION=32-true STRATEGY=ddp BUDGET=${GPU_CHECK_BUDGET_S:-600}
  KR_NOTE="rehearsal: ddp on one CPU process stands in for fsdp (Lightning refuses FSDP on a CPU), with --trainer.sync_batchnorm false (DDP converts BatchNorm to SyncBatchNorm even at world 1, which needs a GPU)"
  WORKERS=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GPU_CHECK_COMPILE_BACKEND=aot_eager TORCHINDUCTOR_COMPILE_THREADS=1
  STEP=(--preset demo --batch 8 --steps 2 --warmup 1 --repeats 1)
  STEP_COMPILED=(--preset demo --batch 8 --steps 1 --warmup 1 --repeats 1)
  IMAGES=(--train 48 --val 18 --classes 6 --procs 1)
  PIPE=(--batch 8)
  PHOTO=(--batch 8 --global_size 64 --local_size 32 --n_local 2 --warmup 0 --iters 2)
  FIT=(--steps 6 --batch 8)
  KR=(--steps 6 --every 2 --batch 8)
  KR_EXTRA=(--trainer.sync_batchnorm false)
  TINY=(--model.backbone.init_args.depth 1 --model.backbone.init_args.embed_dim 48 --model.backbone.init_args.num_heads 2
        --model.dino.out_dim 256 --model.dino.hidden_dim 64 --model.dino.bottleneck_dim 32
        --data.train_transform.init_args.global_crop_size 64 --data.train_transform.init_args.local_crop_size 32
        --data.train_transform.init_args.n_local_crops 2)
  KNN=(--device cpu --precision 32-true --batch_size 16)
fi
DEADLINE=$((START + BUDGET))
FIT_FLAGS=(--recipe dino_small_p16 --data.root "$DATA" --trainer.accelerator "$ACCEL" --trainer.devices 1
           --trainer.precision "$PRECISION" --trainer.callbacks '[]' --trainer.enable_progress_bar false
           --data.num_workers "$WORKERS" "${TINY[@]}")

record() { python3 "$HELP" record --out "$OUT" --mode "$MODE" "$@"; }
merge() { python3 "$HELP" merge --work "$WORK" --out "$OUT"; }

# part NAME CMD...: run CMD under `timeout` (the part's limit or what is left of the budget), record
# ok / failed / timed out, or skip it when too little time is left; never stops the check
part() {
  local name=$1 now left limit t0 rc status
  shift
  if [ -n "${GPU_CHECK_PARTS:-}" ] && [ "$name" != install ] && [[ " $GPU_CHECK_PARTS " != *" $name "* ]]; then
    record --name "$name" --status "not selected"
    return 0
  fi
  now=$(date +%s)
  left=$((DEADLINE - now - RESERVE))
  limit=${LIMIT[$name]}
  ((limit > left)) && limit=$left
  if ((limit < MIN_PART)); then
    echo "=== part $name: skipped, ${left}s of the budget left"
    record --name "$name" --status skipped --note "budget: ${left}s left"
    return 0
  fi
  echo "=== part $name (limit ${limit}s, $((DEADLINE - now))s of ${BUDGET}s left): $*"
  t0=$(date +%s.%N)
  timeout -k 15 "$limit" "$@"
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out" ;;
    *) status=failed ;;
  esac
  echo "=== part $name: $status (exit $rc)"
  record --name "$name" --status "$status" --code "$rc" --limit "$limit" \
    --seconds "$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $t0 }")"
  merge
}

echo "gpu_check ($MODE) on $(hostname), $(date -u +%FT%TZ), budget ${BUDGET}s, work folder $WORK"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
grep -m1 "model name" /proc/cpuinfo || true

# the wheels this python3 accepts (abi3 and pure ones are shared by 3.11 and 3.12), one per project
SITE=$WORK/site  # fresh: $WORK was emptied above
mapfile -t WHEELS < <(python3 - <<'PYEOF'
import collections, pathlib, sys
from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import parse_wheel_filename
accepted, chosen = set(sys_tags()), collections.defaultdict(list)
for whl in sorted(pathlib.Path(".whl").glob("*.whl")):
    name, _, _, tags = parse_wheel_filename(whl.name)
    if tags & accepted:
        chosen[name].append(str(whl))
for name, files in chosen.items():
    if len(files) > 1:
        sys.exit(f"gpu_check: several wheels of {name} fit this python3: {files}")
    print(files[0])
PYEOF
)
echo "python3: $(command -v python3) ($(python3 --version 2>&1)); wheels: ${WHEELS[*]##*/}"

if [ "$MODE" = rehearse ]; then
  python3 benchmarks/gpu_check/rehearsal_python.py --venv "${GPU_CHECK_VENV:-.venv}" --dest "$WORK/python" \
    --json "$WORK/json/rehearsal_python.json"
  PY=$WORK/python/bin/python3
  export PYTHONPATH="$SITE:$REPO:$REPO/benchmarks/gpu_check/rehearsal_site"
else
  export PYTHONPATH="$SITE:$REPO"
fi
record --name - --note "{\"budget_s\": $BUDGET, \"python\": \"$PY\", \"site\": \"$SITE\", \"work\": \"$WORK\", \"strategy\": \"$STRATEGY\", \"started\": \"$(date -u +%FT%TZ)\"}"

part install python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${WHEELS[@]}"
part env "$PY" "$HELP" env --site "$SITE" --wheels .whl --json "$WORK/json/env.json"
part step_eager "$PY" benchmarks/bench_dino.py --device "$DEVICE" --precision "$PRECISION" "${STEP[@]}" --json "$WORK/json/step_eager.json"
part data_write "$PY" "$HELP" write-data --root "$DATA" "${IMAGES[@]}"
part data_pipeline "$PY" "$HELP" data-pipeline --root "$DATA" --workers "$WORKERS" "${PIPE[@]}" --json "$WORK/json/data_pipeline.json"
part fit "$PY" "$HELP" fit --work "$WORK" "${FIT[@]}" --json "$WORK/json/fit.json" -- "${FIT_FLAGS[@]}"
part kill_resume "$PY" "$HELP" kill-resume --work "$WORK" --strategy "$STRATEGY" "${KR[@]}" --note "$KR_NOTE" \
  --json "$WORK/json/kill_resume.json" -- "${FIT_FLAGS[@]}" --model.optim.warmup_epochs 0 "${KR_EXTRA[@]}"
part knn "$PY" "$HELP" knn --work "$WORK" --root "$DATA" --checkpoint "$WORK/fit_run/checkpoints/last.ckpt" \
  --json "$WORK/json/knn.json" -- "${KNN[@]}" --num_workers "$WORKERS"
part step_compiled "$PY" benchmarks/bench_dino.py --device "$DEVICE" --precision "$PRECISION" "${STEP_COMPILED[@]}" --compile \
  --json "$WORK/json/step_compiled.json"
part photometric "$PY" "$HELP" photometric --device "$DEVICE" "${PHOTO[@]}" --json "$WORK/json/photometric.json"

merge
record --name - --note "{\"seconds\": $(($(date +%s) - START))}"
echo "gpu_check ($MODE): $(($(date +%s) - START))s; $OUT/parts.json:"
cat "$OUT/parts.json"
python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['summary'], indent=2))" "$OUT/results.json"
