"""Sync stage: push the student's weights (buckets of HF-named tensors) to the rollout engine.

`make_weight_sync(rollout_cfg, client, ...)` picks the path from `rollout.sync_mode`
(tensor | disk | distributed); each has `push(buckets, weight_version=None)`.
`probe_gap` measures the engine/trainer log-prob gap afterwards. These take buckets from
any source and import no Megatron code; `Student.push_weights` drives the Megatron
student's exporter (on every rank) into them.
"""

from __future__ import annotations

from pathlib import Path

from mopd_megatron.config import RolloutConfig
from mopd_megatron.rollout.client import EngineClient
from mopd_megatron.rollout.sglang import free_port
from mopd_megatron.sync.disk import DiskSync, write_hf_checkpoint
from mopd_megatron.sync.distributed import DistributedSync
from mopd_megatron.sync.probe import probe_gap
from mopd_megatron.sync.tensor import TensorSync

__all__ = ["DiskSync", "DistributedSync", "TensorSync", "make_weight_sync", "probe_gap",
           "write_hf_checkpoint"]


def make_weight_sync(cfg: RolloutConfig, client: EngineClient, *, template_dir: str | Path,
                     work_dir: str | Path, master_address: str = "127.0.0.1",
                     master_port: int = 0) -> DiskSync | TensorSync | DistributedSync:
    """The weight sync that `cfg.sync_mode` names.

    Args:
        cfg: The rollout section of the recipe.
        client: The rollout engine's client.
        template_dir: The student's HF folder (config/tokenizer for the disk path).
        work_dir: Where the disk path writes its checkpoint (`<work_dir>/weights`).
        master_address: This process's address for the distributed path's group.
        master_port: Its rendezvous port (0 = a free one).

    Returns:
        An object with `push(buckets, weight_version=None)`.
    """
    if cfg.sync_mode == "disk":
        return DiskSync(client, Path(work_dir) / "weights", template_dir)
    if cfg.sync_mode == "distributed":
        backend = "gloo" if cfg.engine == "local" else "nccl"
        return DistributedSync(client, master_address, master_port or free_port(master_address),
                               backend=backend)
    return TensorSync(client)
