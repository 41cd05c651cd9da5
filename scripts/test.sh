#!/usr/bin/env bash
# Set up ./.venv and run the default test suite (fast CPU tests plus the 2-process gloo `ddp` tests).
# Slow tests (every family, full GFLOPs table): bash scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
