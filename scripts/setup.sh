#!/usr/bin/env bash
# Create .venv and install lightning-md4 with everything it needs. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch-fidelity needs a torchvision built for the installed torch, so the pair is installed first.
case "$(uname -m)" in
  aarch64) .venv/bin/pip install -q torch==2.9.1 torchvision==0.24.1 ;;
  *) .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 ;;
esac
.venv/bin/pip install -q -e '.[dev]'
