#!/usr/bin/env bash
# Create ./.venv (once) and install xcit-ssl with its test extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    echo "setup: python3-venv is missing; installing it with apt-get" >&2
    rm -rf .venv
    as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv
    "$PY" -m venv .venv
  fi
fi
# A local CPU-only torch wheel may sit in a pip find-links folder; the registry's build is the one we want.
export PIP_FIND_LINKS="" PIP_DISABLE_PIP_VERSION_CHECK=1
if ! .venv/bin/python -c "import xcit_ssl, torch, torchvision, torchdata, webdataset, litdata, matplotlib, lightning, timm, faiss, pytest, fvcore, onnxruntime, mlflow" 2>/dev/null; then
  # -qq: errors only (a failed install still stops the script); the build backend and pip configs of
  # some machines print pages of notices that are not about this project
  echo "setup: installing xcit-ssl and its dependencies into .venv (a few minutes, once)" >&2
  .venv/bin/python -m pip install -qq --upgrade pip
  .venv/bin/python -m pip install -qq -e ".[dev]"
fi
