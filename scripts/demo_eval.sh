#!/usr/bin/env bash
# The demo's evaluation of a finished run, as one table: the same k-NN (k = 20) and fast linear probe
# (base lr chosen on held-out training images; its last epoch is the number shown, no epoch is chosen on the
# test images) for the DINO teacher of RUN, the same network at random initialisation (seed 0) and the raw
# pixels of the same images; every comparison computed, not quoted.
# Features, for every network row alike: the CLS token and a three-level spatial pyramid of the patch
# tokens (their mean, the means of the 4 quadrants and of the 4 x 4 cells of the token grid; at 32 px and
# patch 8 the grid itself): --features.pooling cls+pyramid3. POOLING=cls+pyramid (two levels) or cls
# (DINO's protocol) gives the other tables of eval/results_fmnist.md.
#   bash scripts/demo_eval.sh runs/dino_nano_fmnist_20261202-101500   # -> <run>/demo_results.json
#   POOLING=cls+pyramid bash scripts/demo_eval.sh RUN_DIR
set -euo pipefail
RUN=${1:?usage: bash scripts/demo_eval.sh RUN_DIR (a run folder of xcit-ssl fit)}
RUN=$(realpath -m "$RUN")  # relative to where it was called from, before the cd to the repository
cd "$(dirname "$0")/.."
CKPT="$RUN/checkpoints/last.ckpt"
if [ ! -f "$CKPT" ]; then
  echo "demo_eval: $CKPT not found: pass the folder of a finished xcit-ssl fit run" >&2
  exit 2
fi
POOLING=${POOLING:-cls+pyramid3}
X=.venv/bin/xcit-ssl
E="$RUN/eval"
LIN=(--protocol linear_fmnist --linear.fast true)
for who in dino random pixels; do
  case $who in
    dino) src=(--checkpoint "$CKPT" --features.pooling "$POOLING") ;;
    random) src=(--random_init "$CKPT" --features.pooling "$POOLING") ;;  # its architecture, seed 0
    pixels) src=(--raw_pixels true) ;;
  esac
  $X knn --protocol knn_fmnist "${src[@]}" --progress false --out "$E/knn_$who.json"
  $X linear "${LIN[@]}" "${src[@]}" --progress false --out "$E/linear_$who.json"
done
$X summary --k 20 --out "$RUN/demo_results.json" \
  --row "raw pixels" "$E/knn_pixels.json" "$E/linear_pixels.json" \
  --row "random init (the same network)" "$E/knn_random.json" "$E/linear_random.json" \
  --row "DINO teacher ($RUN)" "$E/knn_dino.json" "$E/linear_dino.json"
