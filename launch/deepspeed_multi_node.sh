#!/usr/bin/env bash
# Several nodes through the deepspeed launcher (pdsh/ssh): run this on the first node.
#   launch/deepspeed_multi_node.sh launch/hostfile.example configs/vit-l-14.yaml train.zero_stage=3
# The hostfile lists "hostname slots=N" per node; every node needs the same checkout and venv at the
# same path and reachable shards (s3:// or a shared filesystem); checkpoint.dir must be shared too.
set -euo pipefail
HOSTFILE=${1:?usage: $0 HOSTFILE CONFIG [key=value ...]}
CONFIG=${2:?usage: $0 HOSTFILE CONFIG [key=value ...]}
shift 2
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
    --no_local_rank --module pipeline train --config "$CONFIG" "$@"
