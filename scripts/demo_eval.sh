#!/usr/bin/env bash
# The demo's evaluation of a finished run, as one table: the same k-NN (k = 20) and fast linear probe
# (base lr chosen on held-out training images; its last epoch is the number shown, no epoch is chosen on the
# test images) for the DINO teacher of RUN, the same network at random initialisation (seed 0) and the raw
# pixels of the same images; every comparison computed, not quoted.
# Features, for every network row alike: first DINO's protocol, the teacher's CLS token
# (--features.pooling cls), then as an extra the CLS token with a three-level spatial pyramid of the patch
# tokens (their mean, the means of the 4 quadrants and of the 4 x 4 cells of the token grid):
# cls+pyramid3. POOLING=cls+pyramid (two levels) changes the extra; POOLING=cls leaves it out.
#   bash scripts/demo_eval.sh runs/dino_nano_fmnist_20261202-101500   # -> <run>/demo_results.json
#   POOLING=cls bash scripts/demo_eval.sh RUN_DIR                     # the CLS columns only
set -euo pipefail
RUN=${1:?usage: bash scripts/demo_eval.sh RUN_DIR (a run folder of xcit-ssl fit)}
RUN=$(realpath -m "$RUN")  # relative to where it was called from, before the cd to the repository
cd "$(dirname "$0")/.."
CKPT="$RUN/checkpoints/last.ckpt"
if [ ! -f "$CKPT" ]; then
  echo "demo_eval: $CKPT not found: pass the folder of a finished xcit-ssl fit run" >&2
  exit 2
fi
EXTRA=${POOLING:-cls+pyramid3}  # the extra feature beside the CLS token; POOLING=cls: the CLS columns only
X=.venv/bin/xcit-ssl
E="$RUN/eval"
LIN=(--protocol linear_fmnist --linear.fast true)
pools=(cls)
[ "$EXTRA" != cls ] && pools+=("$EXTRA")
for who in pixels random dino; do
  for pool in "${pools[@]}"; do
    case $who in
      dino) src=(--checkpoint "$CKPT" --features.pooling "$pool") ;;
      random) src=(--random_init "$CKPT" --features.pooling "$pool") ;;  # its architecture, seed 0
      pixels) [ "$pool" = cls ] || continue; src=(--raw_pixels true) ;;  # one feature: the pixels
    esac
    $X knn --protocol knn_fmnist "${src[@]}" --progress false --out "$E/knn_${who}_$pool.json"
    $X linear "${LIN[@]}" "${src[@]}" --progress false --out "$E/linear_${who}_$pool.json"
  done
done
files() { for pool in "${pools[@]}"; do for f in "$E"/{knn,linear}_"$1_$pool".json; do [ -f "$f" ] && echo "$f"; done; done; }
mapfile -t PIX < <(files pixels)
mapfile -t RND < <(files random)
mapfile -t DIN < <(files dino)
$X summary --k 20 --out "$RUN/demo_results.json" \
  --row "raw pixels" "${PIX[@]}" \
  --row "random init (the same network)" "${RND[@]}" \
  --row "DINO teacher" "${DIN[@]}"
