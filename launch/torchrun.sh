#!/usr/bin/env bash
# torchrun, one node (or several: run on each node with NNODES, NODE_RANK and MASTER_ADDR set).
#   launch/torchrun.sh 8 configs/vit-b-16.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 launch/torchrun.sh 8 configs/vit-b-16.yaml
set -euo pipefail
NPROC=${1:?usage: $0 NPROC_PER_NODE CONFIG [key=value ...]}
CONFIG=${2:?usage: $0 NPROC_PER_NODE CONFIG [key=value ...]}
shift 2
if [[ -z "${NNODES:-}" || "${NNODES}" == 1 ]]; then
    exec torchrun --standalone --nproc_per_node "$NPROC" -m pipeline train --config "$CONFIG" "$@"
fi
exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --nproc_per_node "$NPROC" \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
    -m pipeline train --config "$CONFIG" "$@"
