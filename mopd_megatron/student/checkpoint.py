"""Student stage: resumable distributed checkpoints (Megatron `dist_checkpointing`, torch_dist).

Layout on disk (Megatron-LM's naming):

    <dir>/iter_0000010/      one checkpoint: sharded tensors + common state, written by all ranks
    <dir>/latest             the step of the newest complete checkpoint, written last

A checkpoint holds the model (`model`, or `model0`, `model1`, ... with virtual stages), the
optimizer (Adam moments and step, per parameter shard), the LR scheduler, every rank's RNG
states (Python, NumPy, torch, CUDA, Megatron's model-parallel tracker), the parallel layout,
and a caller-provided `extra` dict (step, data-sampler position, ...). Loading at the same
layout resumes bit-exactly. Model weights also load at another TP / PP / EP layout (Megatron
reshards them); the RNG states are then left as they are, and the optimizer state may not
reshard (a later issue).

`check_checkpoint` reads a folder's indexes (not its tensors) and names the first missing,
truncated or unreadable file in one line; loading calls it first.

The save needs: the folder to exist first (rank 0 makes it), `psutil`, and an
`if __name__ == "__main__":` guard in the entry script, because the torch_dist writer starts
a `spawn` multiprocessing manager, which re-imports `__main__`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch.distributed.checkpoint import FileSystemReader

from mopd_megatron.student.model import sharded_state_dict as model_sharded_state_dict
from mopd_megatron.student.model import unwrap

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded: the file and what is wrong, in one line."""


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """`<root>/iter_<step, 7 digits>`."""
    return Path(root) / f"iter_{step:07d}"


def latest_step(root: str | Path) -> int | None:
    """The step named by `<root>/latest`, or None when there is no complete checkpoint."""
    marker = Path(root) / LATEST
    return int(marker.read_text().strip()) if marker.is_file() else None


def save_checkpoint(
    root: str | Path,
    step: int,
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    extra: dict | None = None,
    keep_last: int = 0,
) -> Path:
    """Save a checkpoint of `step` on every rank, mark it latest, and prune old ones.

    Args:
        root: the checkpoint folder (`CheckpointConfig.dir`).
        step: the number of optimizer steps taken so far.
        model_chunks: this rank's chunks (DDP-wrapped or not).
        optimizer: the Megatron optimizer.
        scheduler: the LR scheduler.
        extra: picklable caller state, identical on every rank (step, sampler position, ...).
        keep_last: keep only the newest `keep_last` checkpoints (0 = keep all).

    Returns:
        The checkpoint's folder.
    """
    path = checkpoint_dir(root, step)
    if dist.get_rank() == 0:
        if path.exists():  # an earlier (maybe incomplete) save of this step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    state = _state_dict(model_chunks, optimizer, extra, is_loading=False)
    state["scheduler"] = scheduler.state_dict()
    dist_checkpointing.save(state, str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = Path(root) / f".{LATEST}.tmp"
        tmp.write_text(f"{step}\n")
        os.replace(tmp, Path(root) / LATEST)
        if keep_last > 0:
            for old in sorted(Path(root).glob("iter_*"))[:-keep_last]:
                shutil.rmtree(old)
    dist.barrier()
    return path


def load_checkpoint(
    root: str | Path,
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None = None,
    scheduler: OptimizerParamScheduler | None = None,
    step: int | None = None,
) -> dict | None:
    """Load a checkpoint into the model (and optimizer, scheduler, RNG when given / same layout).

    Args:
        root: the checkpoint folder.
        model_chunks: this rank's chunks, built at any layout.
        optimizer: restored when given (same layout only).
        scheduler: restored when given.
        step: which checkpoint; default the latest.

    Returns:
        The `extra` dict saved with it, or None when `root` has no checkpoint.

    Raises:
        CheckpointError: a missing, truncated or unreadable file (`check_checkpoint`).
    """
    step = latest_step(root) if step is None else step
    if step is None:
        return None
    path = str(checkpoint_dir(root, step))
    check_checkpoint(path)
    same_layout = dist_checkpointing.load_common_state_dict(path)["layout"] == _layout()
    state = _state_dict(
        model_chunks, optimizer, None, is_loading=True, with_rng=same_layout
    )
    loaded = dist_checkpointing.load(state, path)
    for key, chunk in zip(_model_keys(model_chunks), model_chunks, strict=True):
        unwrap(chunk).load_state_dict(loaded[key])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.num_steps = 0  # load_state_dict advances the current count by the saved one
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return loaded["extra"]


def check_checkpoint(path: str | Path) -> None:
    """Check a checkpoint folder against its own indexes before anything loads it.

    Reads metadata.json, the common state (common.pt) and the tensor index (.metadata) with
    Megatron's and torch's own readers, and checks that every byte range the index lists lies
    within its .distcp file. The tensors themselves are not read.

    Raises:
        CheckpointError: naming the first missing, truncated or unreadable file.
    """
    path = Path(path)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path}: not a Megatron distributed checkpoint (no metadata.json)")
    _read(path / "metadata.json", lambda: json.loads((path / "metadata.json").read_text()))
    _read(path / "common.pt", lambda: dist_checkpointing.load_common_state_dict(str(path)))
    index = _read(path / ".metadata", FileSystemReader(str(path)).read_metadata)
    ends: dict[str, int] = {}
    for item in index.storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for name, end in sorted(ends.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the tensor index .metadata lists it)")
        if file.stat().st_size < end:
            raise CheckpointError(
                f"{file}: truncated: {file.stat().st_size} bytes, but its tensors end at byte "
                f"{end} (an interrupted save or copy)"
            )


def _read(file: Path, read: Callable):
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return read()
    except Exception as err:  # noqa: BLE001 - whatever the reader raises, the file is bad
        detail = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
        what = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        raise CheckpointError(f"{file}: unreadable, truncated or corrupt ({what})") from None


def _model_keys(model_chunks: list[torch.nn.Module]) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _state_dict(
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer | None,
    extra: dict | None,
    *,
    is_loading: bool,
    with_rng: bool = True,
) -> dict:
    """The sharded state dict to save, or the template to load into."""
    state = model_sharded_state_dict([unwrap(chunk) for chunk in model_chunks])
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading)
    if with_rng:
        state["rng_state"] = ShardedObject(
            "rng_state",
            _get_rng_state(),
            (dist.get_world_size(),),
            (dist.get_rank(),),
            replica_id=0,
        )
    state["layout"] = _layout()
    state["extra"] = extra
    return state


def _layout() -> dict[str, int]:
    """The parallel sizes that decide how the state is sharded."""
    ps = parallel_state
    return {
        "world": dist.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
    }


def _get_rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
