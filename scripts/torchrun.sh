#!/usr/bin/env bash
# `md4 fit` under torchrun, on one node or as one node of several (run it once per node).
#
#   NPROC_PER_NODE=8 bash scripts/torchrun.sh --config configs/text8.yaml
#   # each of 2 nodes (same MASTER_ADDR/PORT, the address of one of them, which hosts the rendezvous):
#   NNODES=2 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC_PER_NODE=8 MAX_RESTARTS=3 \
#       bash scripts/torchrun.sh --config configs/text8.yaml --ckpt_path last
#
# Several nodes meet through torchrun's c10d rendezvous, whose store the agent on MASTER_ADDR keeps
# (that node must stay up; the others may fail and come back); node ranks are handed out by it, so
# NODE_RANK is not needed. With MAX_RESTARTS=N, when a worker of any node fails (a crash, a node lost
# and restarted), every agent restarts its workers, up to N times, with the same arguments: pass
# --ckpt_path last (the first start finds no checkpoint and starts the run), and the restarted run
# resumes exactly from the newest checkpoint (README: Fault tolerance). Optional: RDZV_ID (the job's
# name, default md4), RDZV_CONF (e.g. join_timeout=600), LOCAL_ADDR (the address this node gives the
# others, default its hostname), LOG_DIR (torchrun's per-worker logs).
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
    RDZV=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}"
          --rdzv-id "${RDZV_ID:-md4}")
    [ -n "${RDZV_CONF:-}" ] && RDZV+=(--rdzv-conf "$RDZV_CONF")
    [ -n "${LOCAL_ADDR:-}" ] && RDZV+=(--local-addr "$LOCAL_ADDR")
    # Workers get a store of their own for each round. With the rendezvous store shared (torch's
    # default), an agent that survives a round as rank 0 does not publish its address for the next
    # round, and a node that comes back after a failure waits for it until the rendezvous times out.
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
else
    RDZV=(--standalone)
fi
RDZV+=(--max-restarts "${MAX_RESTARTS:-0}")
[ -n "${LOG_DIR:-}" ] && RDZV+=(--log-dir "$LOG_DIR")
exec "$PY" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC" -m lightning_md4.cli fit \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" --trainer.strategy "${STRATEGY:-ddp}" "$@"
