#!/usr/bin/env bash
# Several nodes through the deepspeed launcher (pdsh/ssh): run this on the first node of the hostfile.
#   launch/deepspeed_multi_node.sh launch/hostfile.example configs/vit-l-14.yaml train.zero_stage=3
# The hostfile lists "hostname slots=N" per node; every node needs the same checkout and venv at the
# same path and reachable shards (s3:// or a shared filesystem); checkpoint.dir must be shared too.
# Extra deepspeed launcher flags go in DEEPSPEED_ARGS (e.g. "--ssh_port 2222").
# Stop signals: pdsh cannot pass a signal through ssh, and deepspeed's runner answers one by killing every
# node's launcher. pipeline.commands.supervise stands in front of it instead: SIGTERM, SIGUSR1 or SIGINT to this
# script's process is passed to this node's ranks (found by MASTER_PORT in their environment); at their next
# step every rank on every node learns that one was told, all save the same checkpoint and exit 75, and
# pdsh -S, the runner and this process exit 75.
set -euo pipefail
HOSTFILE=${1:?usage: $0 HOSTFILE CONFIG [key=value ...]}
CONFIG=${2:?usage: $0 HOSTFILE CONFIG [key=value ...]}
shift 2
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
PORT=${MASTER_PORT:-29500}
# shellcheck disable=SC2086  # DEEPSPEED_ARGS is a list of flags
exec "${PYTHON:-python}" -m pipeline.commands.supervise --master-port "$PORT" -- \
    deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$PORT" ${DEEPSPEED_ARGS:-} \
    --no_local_rank --module pipeline train --config "$CONFIG" "$@"
