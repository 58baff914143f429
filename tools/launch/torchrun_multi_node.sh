#!/bin/bash
# The student over several nodes under torchrun: run this on every node, with the same
# recipe, when another scheduler (or a person) places the processes. The rollout engine and
# the teachers run elsewhere: the recipe points at them with `engine: url`. The whole job,
# servers included, from one command: `mopd-megatron launch RECIPE --hosts H0,H1,...` on every
# node, or `mopd-megatron launch RECIPE --slurm`.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 tools/launch/torchrun_multi_node.sh RECIPE [key=value ...]
#   NNODES, NODE_RANK, MASTER_ADDR  required; MASTER_PORT (default 29500),
#   NPROC_PER_NODE (default 8), DRY_RUN=1 prints the command instead of running it
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: NNODES=N NODE_RANK=R MASTER_ADDR=HOST $0 RECIPE [key.sub=value ...]" >&2
    exit 2
fi
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
recipe=$1
shift
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
exec ${DRY_RUN:+echo} "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="${NPROC_PER_NODE:-8}" \
    --master-addr="$MASTER_ADDR" --master-port="${MASTER_PORT:-29500}" \
    -m mopd_megatron.cli train "$recipe" "$@"
