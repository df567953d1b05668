#!/usr/bin/env bash
# Set up (if needed), then the main job: train class-conditional MD4 on the embedded digits data,
# report the test NELBO in bits per dimension (unconditional: the null label, a bound on -log p(x),
# comparable with unconditional models; then conditional on the true digit, -log p(x | y)), and
# write a PNG grid of guided samples, one row per digit 0-9.
# The run's folder: runs/digits, the folder of configs/digits.yaml that the README's examples use;
# a later demo, which must not overwrite that run, writes runs/digits-<date>-<time> (or RUN=FOLDER).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${RUN:-}" ]; then
  RUN=runs/digits
  if compgen -G "$RUN/checkpoints/*.ckpt" > /dev/null; then
    RUN=runs/digits-$(date +%Y%m%d-%H%M%S)
    echo "runs/digits holds an earlier run; this one goes to $RUN"
  fi
fi
LAST="$RUN/checkpoints/last.ckpt"
.venv/bin/md4 fit --config configs/digits.yaml --trainer.default_root_dir "$RUN"
echo "== Unconditional test bound (null label): bits per dimension of -log p(x)"
.venv/bin/md4 test --config configs/digits.yaml --trainer.default_root_dir "$RUN" --ckpt_path "$LAST"
echo "== Conditional test bound (true digit): bits per dimension of -log p(x | y)"
# Its own folder, so TensorBoard does not show two test/nelbo values at one step of the run.
.venv/bin/md4 test --config configs/digits.yaml --trainer.default_root_dir "$RUN/test-conditional" --ckpt_path "$LAST" \
  --data.init_args.eval_null_label false
.venv/bin/md4 sample --ckpt_path "$LAST" --num_samples 100 --steps 64 --guidance 2.0 --output "$RUN/samples.png"
echo "Run folder: $RUN"
echo "Samples: $RUN/samples.png (row d: ten samples of digit d, guidance 2.0)"
echo "TensorBoard: .venv/bin/tensorboard --logdir $RUN"
