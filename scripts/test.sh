#!/usr/bin/env bash
# Set up ./.venv and run the default test suite (fast CPU tests plus the 2-process gloo `ddp` tests).
# Slow tests (every family, full GFLOPs table): bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "test: installing Debian's dataset-fashion-mnist (the tests train and evaluate on real images)" >&2
  as_root apt-get update -qq && as_root apt-get install -y -qq dataset-fashion-mnist
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
