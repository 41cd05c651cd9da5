#!/usr/bin/env bash
# The main job: DINO pretraining of a 3-block XCiT-N/8 on Fashion-MNIST (real data), then k-NN and
# linear-probe evaluation of the teacher next to the same network at random initialisation and the raw
# pixels, as one table (also written to <run>/demo_results.json). Features, for every network row alike:
# the CLS token and a two-level spatial pyramid of the patch tokens (their mean and the means of the 4
# quadrants of the 4x4 token grid), concatenated (--features.pooling cls+pyramid).
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "demo: installing Debian's dataset-fashion-mnist" >&2
  as_root apt-get update -qq && as_root apt-get install -y -qq dataset-fashion-mnist
fi
bash scripts/setup.sh
RECIPE=${RECIPE:-dino_nano_fmnist}  # RECIPE=dino_nano_fmnist_long: the 5-epoch version, same table
RUN=${RUN_DIR:-runs/${RECIPE}_$(date +%Y%m%d-%H%M%S)}
X=.venv/bin/xcit-ssl
E="$RUN/eval"
$X fit --recipe "$RECIPE" --run_dir "$RUN" "$@"
# the same k-NN (k = 20) and fast linear probe for the DINO teacher, the same network at random
# initialisation, and the raw pixels of the same images: every comparison computed, not quoted
CKPT="$RUN/checkpoints/last.ckpt"
LIN=(--protocol linear_fmnist --linear.fast true)
for who in dino random pixels; do
  case $who in
    dino) src=(--checkpoint "$CKPT" --features.pooling cls+pyramid) ;;
    random) src=(--random_init "$CKPT" --features.pooling cls+pyramid) ;;  # its architecture, seed 0
    pixels) src=(--raw_pixels true) ;;
  esac
  $X knn --protocol knn_fmnist "${src[@]}" --progress false --out "$E/knn_$who.json"
  $X linear "${LIN[@]}" "${src[@]}" --progress false --out "$E/linear_$who.json"
done
$X summary --k 20 --out "$RUN/demo_results.json" \
  --row "raw pixels" "$E/knn_pixels.json" "$E/linear_pixels.json" \
  --row "random init (the same network)" "$E/knn_random.json" "$E/linear_random.json" \
  --row "DINO teacher ($RUN)" "$E/knn_dino.json" "$E/linear_dino.json"
