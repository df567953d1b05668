#!/usr/bin/env bash
# The OpenWebText + zero-shot pipeline end to end on the CPU, through the md4 command, on fixture
# files made from a local text corpus: fit a tiny MD4 on GPT-2 tokens, then print and save the
# zero-shot perplexity table. Usage: bash scripts/owt_demo.sh [corpus.txt] (RUN=folder to change
# where it writes; STEPS=N for the training steps).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/md4 ] || bash scripts/setup.sh
CORPUS=${1:-../shared/data/tinyshakespeare.txt}
RUN=${RUN:-runs/owt_demo}
STEPS=${STEPS:-300}
FIX="$RUN/fixture"
.venv/bin/python scripts/owt_fixture.py "$CORPUS" "$FIX"
.venv/bin/md4 fit --config configs/owt_tiny.yaml --trainer.default_root_dir="$RUN" \
    --trainer.max_steps="$STEPS" --data.init_args.paths="[$FIX/owt.jsonl]"
.venv/bin/md4 test --config "$RUN/tensorboard/config.yaml" --ckpt_path "$RUN/checkpoints/last.ckpt" --eval_draws 8
.venv/bin/md4 zeroshot --ckpt_path "$RUN/checkpoints/last.ckpt" --data_dir "$RUN/zeroshot_cache" \
    --eval_draws 8 --batch_size 16 --devices 1 --num_workers 0 \
    --paths.lambada "$FIX/lambada_test.jsonl" --paths.wikitext2 "$FIX/wiki2.train.raw" \
    --paths.wikitext103 "$FIX/wiki103.test.raw" --paths.ptb "$FIX/ptb.test.txt" --paths.lm1b "$FIX/lm1b.test.txt"
