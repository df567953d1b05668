#!/usr/bin/env bash
# Create .venv and install lightning-md4 with everything it needs. Safe to rerun: when the install
# is current (a stamp in .venv holds a checksum of pyproject.toml and this script, and this
# checkout's lightning_md4 imports from outside it) pip is skipped. SETUP_FORCE=1 reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROOT=$(pwd)
STAMP=.venv/.setup-stamp
wanted=$(cat pyproject.toml scripts/setup.sh | cksum)
installed_here() {  # from /, so that the import finds the installed package, not the current folder
  (cd / && "$ROOT/.venv/bin/python" -c \
    "import sys, lightning_md4; sys.exit(not lightning_md4.__file__.startswith(sys.argv[1]))" "$ROOT/") 2>/dev/null
}
if [ "${SETUP_FORCE:-0}" != 1 ] && [ -x .venv/bin/md4 ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted" ] && installed_here; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
rm -f "$STAMP"  # a failed install below leaves no stamp, so the next run retries
.venv/bin/python -m pip install -q --upgrade pip
# torch-fidelity needs a torchvision built for the installed torch, so the pair is installed first.
case "$(uname -m)" in
  aarch64) .venv/bin/pip install -q torch==2.9.1 torchvision==0.24.1 ;;
  *) .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 ;;
esac
.venv/bin/pip install -q -e '.[dev]'
echo "$wanted" > "$STAMP"
