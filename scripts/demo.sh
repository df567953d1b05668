#!/usr/bin/env bash
# Set up (if needed), then the main job: train MD4 on the embedded digits data, report the test
# NELBO in bits per dimension, and write a PNG grid of samples. Each run gets its own folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${RUN:-runs/digits-$(date +%Y%m%d-%H%M%S)}
.venv/bin/md4 fit --config configs/digits.yaml --trainer.default_root_dir "$RUN"
.venv/bin/md4 test --config configs/digits.yaml --trainer.default_root_dir "$RUN" --ckpt_path "$RUN/checkpoints/last.ckpt"
.venv/bin/md4 sample --ckpt_path "$RUN/checkpoints/last.ckpt" --num_samples 64 --steps 64 --output "$RUN/samples.png"
echo "TensorBoard: .venv/bin/tensorboard --logdir $RUN"
