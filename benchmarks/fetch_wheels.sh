#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), before benchmarks/gpu.sh: downloads into .whl/ (ignored
# by git) the pure-Python packages that the `md4` command imports and the GPU image lacks (it has
# torch, lightning, torchmetrics, torchvision, transformers, tokenizers, numpy, scipy, PyYAML).
# The versions are the ones pyproject.toml resolves to in .venv; pass the folder .whl in the
# device run's carry list.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any --platform manylinux2014_x86_64 -d .whl \
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 omegaconf==2.4.0 \
  torch-fidelity==0.4.0
ls -la .whl
