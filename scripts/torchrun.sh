#!/usr/bin/env bash
# `md4 fit` under torchrun, on one node or as one node of several (run it once per node).
#
#   NPROC_PER_NODE=8 bash scripts/torchrun.sh --config configs/text8.yaml
#   # node i of 2 (run on both nodes, same MASTER_ADDR/PORT; the addresses must reach each other):
#   NNODES=2 NODE_RANK=i MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#       bash scripts/torchrun.sh --config configs/text8.yaml
#
# Lightning reads the layout from torchrun's environment; trainer.num_nodes and trainer.devices are
# set to match here, and the global batch (data.init_args.global_batch_size) is split over them.
# Resume after a crash with the same command plus --ckpt_path last. STRATEGY (default ddp) may be
# e.g. fsdp for models too large to replicate (see README: Sweeps and multi-node).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python )}"
NNODES="${NNODES:-1}"
NPROC="${NPROC_PER_NODE:-1}"
if [ "$NNODES" -gt 1 ]; then
    RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}"
          --master_port "${MASTER_PORT:-29500}")
else
    RDZV=(--standalone)
fi
exec "$PY" -m torch.distributed.run "${RDZV[@]}" --nproc_per_node "$NPROC" -m lightning_md4.cli fit \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" --trainer.strategy "${STRATEGY:-ddp}" "$@"
