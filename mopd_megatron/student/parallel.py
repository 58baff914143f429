"""Student stage: process groups for the Megatron student (TP/PP/VPP/CP/EP/ETP/DP) and RNG seeds.

`init_parallel` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the
process runs alone as world size 1. The order follows Megatron's own set-up: validate the
layout -> `torch.distributed` (gloo without CUDA, nccl with it) ->
`parallel_state.initialize_model_parallel` -> CPU shims (no CUDA only) -> model-parallel RNG
seeding. `teardown_parallel` undoes it, so tests can initialise several layouts in turn.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mopd_megatron.config import ParallelConfig
from mopd_megatron.hf.spec import HFModelSpec
from mopd_megatron.student.cpu_compat import apply_cpu_patches
from mopd_megatron.student.layout import layout_dims, validate_layout

_OWNS_PROCESS_GROUP = {"value": False}


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_parallel(
    parallel: ParallelConfig, seed: int, spec: HFModelSpec | None = None, source: str = "<recipe>"
) -> DistInfo:
    """Initialise torch.distributed and Megatron's parallel state for `parallel`.

    Args:
        parallel: the layout (tp, pp, vpp, cp, ep, etp, backend).
        seed: base seed; stage p draws with `seed + 100 * p`, as Megatron's training does.
        spec: the student's architecture; with it every model-dependent rule of
            `student.layout.validate_layout` is checked (heads, query groups, layers, experts),
            without it only the world-size rules are.
        source: where the layout came from, for error messages.

    Returns:
        This process's `DistInfo`.

    Raises:
        RecipeError: the layout is impossible for this world size or model.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    validate_layout(parallel, world_size, source=source, **layout_dims(parallel, spec))
    from megatron.core import parallel_state, tensor_parallel

    use_cuda = torch.cuda.is_available()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        else:  # a lone process: an in-memory store is enough
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _OWNS_PROCESS_GROUP["value"] = True
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
    )
    apply_cpu_patches()
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device
    )


def teardown_parallel() -> None:
    """Destroy Megatron's groups, and the default process group if `init_parallel` made it."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP["value"] and dist.is_initialized():
        dist.destroy_process_group()
        _OWNS_PROCESS_GROUP["value"] = False
