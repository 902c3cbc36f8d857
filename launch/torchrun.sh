#!/usr/bin/env bash
# torchrun, one node (or several: run on each node with NNODES, NODE_RANK and MASTER_ADDR set).
#   launch/torchrun.sh 8 configs/vit-b-16.yaml
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 launch/torchrun.sh 8 configs/vit-b-16.yaml
# pipeline.commands.supervise stands in front of torchrun on each node: SIGTERM, SIGUSR1 or SIGINT to this script's
# process reaches this node's ranks, which finish their step, save and exit 75, and so does this process
# (torchrun alone gives its workers 30 s, ignores SIGUSR1's purpose and reports a rank's 75 as a failure).
set -euo pipefail
NPROC=${1:?usage: $0 NPROC_PER_NODE CONFIG [key=value ...]}
CONFIG=${2:?usage: $0 NPROC_PER_NODE CONFIG [key=value ...]}
shift 2
SUPERVISE=("${PYTHON:-python}" -m pipeline.commands.supervise --)
if [[ -z "${NNODES:-}" || "${NNODES}" == 1 ]]; then
    exec "${SUPERVISE[@]}" torchrun --standalone --nproc_per_node "$NPROC" -m pipeline train --config "$CONFIG" "$@"
fi
exec "${SUPERVISE[@]}" torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" \
    --nproc_per_node "$NPROC" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
    -m pipeline train --config "$CONFIG" "$@"
