#!/bin/bash
# The student on this node under torchrun (what `mopd-megatron train` does by itself when the
# layout needs several ranks), for runs that want torchrun's own flags. Engines are started
# as the recipe says: `local` ones by rank 0, `url` ones reached over HTTP. To give SGLang
# servers their own GPUs of this node, use `mopd-megatron launch RECIPE` instead.
#
#   tools/launch/torchrun_single_node.sh RECIPE [key.sub=value ...]
#   NPROC_PER_NODE  ranks on this node (default 8)
#   DRY_RUN=1       print the command instead of running it
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 RECIPE [key.sub=value ...]" >&2
    exit 2
fi
recipe=$1
shift
exec ${DRY_RUN:+echo} "${PYTHON:-python}" -m torch.distributed.run --standalone \
    --nproc-per-node="${NPROC_PER_NODE:-8}" \
    -m mopd_megatron.cli train "$recipe" "$@"
