"""Sync stage, by process group: broadcast the student's weights from the trainer to the engine.

Consumes buckets of (HF checkpoint name, tensor) on the trainer's rank 0; produces, inside
one SGLang weight-update session (/begin_weight_update ... /end_weight_update, required by
SGLang 0.5.23), per bucket one POST /update_weights_from_distributed (names, dtypes,
shapes) answered by the engine once it has received the tensors that this rank broadcasts
in the same order. The group has the trainer as rank 0 and the engine's ranks after it
(`rank_offset = 1`); it is created once by `connect()` (POST /init_weights_update_group on
the engine while this process joins the same rendezvous) and left by `close()` (POST
/destroy_weights_update_group, then this side). With SGLang on GPUs the backend is NCCL and
the tensors must be on this rank's CUDA device; the embedded CPU engine takes gloo and CPU
tensors. If the engine refuses a bucket, the group is left mid-protocol: `close()` it and
`connect()` again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch.distributed as dist

from mopd_megatron.rollout.client import EngineClient
from mopd_megatron.rollout.process_group import init_custom_process_group
from mopd_megatron.sync.tensor import Bucket


class DistributedSync:
    """Push weights by `torch.distributed.broadcast` in a group shared with the engine.

    Args:
        client: The rollout engine's client.
        master_address: Address of this process that the engine can reach.
        master_port: A free port on it for the group's rendezvous.
        engine_ranks: Ranks the engine joins with (its tp size; None = ask /server_info).
        backend: 'nccl' for SGLang on GPUs, 'gloo' for the embedded CPU engine.
        group_name: Name of the group on both sides.
    """

    def __init__(self, client: EngineClient, master_address: str, master_port: int, *,
                 engine_ranks: int | None = None, backend: str = "nccl",
                 group_name: str = "weight_update_group"):
        self.client, self.address, self.port = client, master_address, master_port
        self.engine_ranks, self.backend, self.group_name = engine_ranks, backend, group_name
        self.group: dist.ProcessGroup | None = None

    def connect(self) -> None:
        """Create the group: the engine's ranks 1..n (over HTTP) and this process as rank 0.

        Raises:
            EngineError: The engine refused (at once, without waiting for the rendezvous).
        """
        ranks = self.engine_ranks or int(self.client.server_info().get("tp_size", 1))
        joined: Future = Future()

        def join() -> None:  # a daemon thread: abandoned if the engine refuses
            try:
                joined.set_result(init_custom_process_group(
                    self.backend, f"tcp://{self.address}:{self.port}", ranks + 1, 0,
                    self.group_name))
            except Exception as err:  # noqa: BLE001 - handed to the caller
                joined.set_exception(err)
        threading.Thread(target=join, daemon=True, name="weight-group").start()
        self.client.init_weights_update_group(self.address, self.port, 1, ranks + 1,
                                              group_name=self.group_name, backend=self.backend)
        self.group = joined.result()

    def push(self, buckets: Iterable[Bucket], weight_version: str | None = None) -> None:
        """Announce each bucket over HTTP and broadcast its tensors; then flush the cache."""
        if self.group is None:
            self.connect()
        with ThreadPoolExecutor(1) as pool, self.client.weight_update_session():
            for bucket in buckets:
                if not bucket:
                    continue
                names = [name for name, _ in bucket]
                dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
                shapes = [list(t.shape) for _, t in bucket]
                reply = pool.submit(self.client.update_weights_from_distributed, names, dtypes,
                                    shapes, group_name=self.group_name, flush_cache=False,
                                    weight_version=weight_version)
                sent = [t.detach().contiguous() for _, t in bucket]
                works = [dist.broadcast(t, src=0, group=self.group, async_op=True) for t in sent]
                reply.result()  # the engine answers once it has received every tensor
                for work in works:
                    work.wait()
        self.client.flush_cache()

    def close(self) -> None:
        """Leave the group on both sides (the engine's first)."""
        if self.group is not None:
            self.client.destroy_weights_update_group(self.group_name)
            dist.destroy_process_group(self.group)
            self.group = None
