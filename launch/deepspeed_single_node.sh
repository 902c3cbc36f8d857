#!/usr/bin/env bash
# One node, N local ranks through the deepspeed launcher (GPUs, or CPU ranks when there is no GPU).
#   launch/deepspeed_single_node.sh 8 configs/vit-b-32.yaml train.zero_stage=2
# --no_local_rank: ranks read LOCAL_RANK from the environment instead of a --local_rank argument.
# pipeline.commands.supervise stands in front of the launcher: SIGTERM, SIGUSR1 or SIGINT to this script's process
# reaches every rank, which finishes its step, saves and exits 75, and so does this process (the deepspeed
# launcher alone would die at once and leave its ranks training).
set -euo pipefail
NPROC=${1:?usage: $0 NPROC CONFIG [key=value ...]}
CONFIG=${2:?usage: $0 NPROC CONFIG [key=value ...]}
shift 2
PORT=${MASTER_PORT:-29500}
exec "${PYTHON:-python}" -m pipeline.commands.supervise --master-port "$PORT" -- \
    deepspeed --num_gpus "$NPROC" --master_port "$PORT" --no_local_rank \
    --module pipeline train --config "$CONFIG" "$@"
