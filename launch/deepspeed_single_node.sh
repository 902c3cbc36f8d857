#!/usr/bin/env bash
# One node, N local ranks through the deepspeed launcher (GPUs, or CPU ranks when there is no GPU).
#   launch/deepspeed_single_node.sh 8 configs/vit-b-32.yaml train.zero_stage=2
# --no_local_rank: ranks read LOCAL_RANK from the environment instead of a --local_rank argument.
set -euo pipefail
NPROC=${1:?usage: $0 NPROC CONFIG [key=value ...]}
CONFIG=${2:?usage: $0 NPROC CONFIG [key=value ...]}
shift 2
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    --module pipeline train --config "$CONFIG" "$@"
