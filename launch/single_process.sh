#!/usr/bin/env bash
# One plain process (one GPU, or the CPU): no launcher needed.
#   launch/single_process.sh configs/demo-clip.yaml train.steps=50
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [key=value ...]}
shift
exec python -m pipeline train --config "$CONFIG" "$@"
