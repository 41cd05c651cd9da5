#!/usr/bin/env bash
# The main job: DINO pretraining of a 3-block XCiT-N/8 on Fashion-MNIST (real data), then k-NN and
# linear-probe evaluation of the teacher next to the same network at random initialisation and the raw
# pixels, as one table (also written to <run>/demo_results.json; scripts/demo_eval.sh). Features, for
# every network row alike: first DINO's protocol, the CLS token (--features.pooling cls), then as an
# extra the CLS token with a three-level spatial pyramid of the patch tokens (their mean, the means of
# the 4 quadrants and the 16 tokens of the 4x4 grid: cls+pyramid3; POOLING=cls leaves it out).
#   bash scripts/demo.sh                                  # dino_nano_fmnist: 1 epoch (937 steps)
#   RECIPE=dino_nano_fmnist_long bash scripts/demo.sh     # 6 blocks, 6 epochs (up to 2 hours)
#   bash scripts/demo.sh --trainer.max_epochs 2           # extra arguments go to xcit-ssl fit (2 epochs)
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "demo: installing Debian's dataset-fashion-mnist" >&2
  as_root apt-get update -qq && as_root apt-get install -y -qq dataset-fashion-mnist
fi
bash scripts/setup.sh
RECIPE=${RECIPE:-dino_nano_fmnist}  # RECIPE=dino_nano_fmnist_long: 6 blocks x 6 epochs, same table
RUN=${RUN_DIR:-runs/${RECIPE}_$(date +%Y%m%d-%H%M%S)}
.venv/bin/xcit-ssl fit --recipe "$RECIPE" --run_dir "$RUN" "$@"
bash scripts/demo_eval.sh "$RUN"
