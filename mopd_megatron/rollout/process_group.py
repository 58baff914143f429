"""Rollout/sync stage, weight-update group: a process group beside torch's default one.

Consumes a rendezvous address, a world size and a rank; produces a `ProcessGroup` for
broadcasting new weights from the trainer (rank 0) to the serving engine's ranks. This is
SGLang's `init_custom_process_group` (the group `/init_weights_update_group` creates on
the server side), so the trainer and an SGLang server meet in the same store under the
same prefix; the embedded CPU engine uses it too (backend gloo). It works with or without
an initialised default group (under torchrun the trainer has one).
"""

from __future__ import annotations

from datetime import timedelta

from torch.distributed import ProcessGroup
from torch.distributed.distributed_c10d import (
    Backend,
    PrefixStore,
    _new_process_group_helper,
    _world,
    rendezvous,
)


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int,
                              group_name: str, timeout_s: float = 600.0) -> ProcessGroup:
    """Join the group `group_name` at `init_method` (tcp://host:port) as `rank`.

    Returns:
        The process group (pass it as `group=` to torch.distributed collectives).
    """
    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
        group_name=group_name, backend_options=None, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group
