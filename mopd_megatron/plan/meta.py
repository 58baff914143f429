"""Planner stage, dry run: build one rank's student shard on the meta device at any layout.

Consumes the student's `HFModelSpec`, the model and parallel settings and a pipeline stage;
produces the rank's Megatron-Core `GPTModel` chunks with every tensor on the meta device (no
memory), so the planner's counts can be checked against Megatron's own modules at the recipe's
real layout (say TP2 x EP8 x PP4) from one CPU process.

The process runs alone (world size 1). Megatron-Core 0.16 sizes every sharded layer from the
process groups in the model's `ProcessGroupCollection`, so each group is replaced by a
stand-in that only answers `size()` and `rank()` as the rank (tp 0, ep 0, pp = stage) would
see them (the embedding group is left out: a tied output layer on the last stage is not
synchronised with the first); nothing communicates while a model is built. The modules are those of
`student.model.build_model` (same `TransformerConfig`, same `GPTModel` arguments) with the
local layer spec, which holds the same parameters as the Transformer Engine one, and
`use_cpu_initialization` with initialisation skipped, so that no tensor lands on a device.
"""

from __future__ import annotations

import torch

from mopd_megatron.config import ModelConfig, ParallelConfig
from mopd_megatron.hf.spec import HFModelSpec
from mopd_megatron.plan.params import RankParams


class StandInGroup:
    """What a layer asks of a process group while it is built: its size and this rank."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def stand_in_groups(parallel: ParallelConfig, world_size: int, stage: int):
    """A `ProcessGroupCollection` of stand-ins for rank (tp 0, cp 0, ep 0, pp `stage`)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    p = parallel
    dp = world_size // (p.tp * p.pp * p.cp)
    expert_dp = world_size // (p.pp * p.ep * p.etp)
    sizes = {
        "tp": p.tp, "pp": (p.pp, stage), "mp": (p.tp * p.pp, stage * p.tp), "pos_embd": 1,
        "cp": p.cp, "tp_cp": p.tp * p.cp,
        "ep": p.ep, "expt_tp": p.etp, "tp_ep": p.etp * p.ep,
        "tp_ep_pp": (p.etp * p.ep * p.pp, stage * p.etp * p.ep), "tp_dp_cp": p.tp * dp * p.cp,
        "dp": dp, "dp_cp": dp * p.cp, "expt_dp": expert_dp, "intra_dp_cp": dp * p.cp,
        "intra_expt_dp": expert_dp, "inter_dist_opt": 1, "intra_dist_opt": dp * p.cp,
    }
    groups = ProcessGroupCollection()
    for name, value in sizes.items():
        size, rank = value if isinstance(value, tuple) else (value, 0)
        setattr(groups, name, StandInGroup(size, rank))
    groups.hcp = []
    groups.embd = None  # no first/last-stage copy of tied embeddings to synchronise
    return groups


def build_rank_on_meta(
    spec: HFModelSpec,
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    world_size: int,
    stage: int,
    padded_vocab: int,
) -> list[torch.nn.Module]:
    """The model chunks of a rank of pipeline stage `stage`, on the meta device.

    Needs `torch.distributed` initialised (a world of one is enough), e.g. by
    `student.parallel.init_parallel(ParallelConfig(), seed)`.

    Args:
        spec: the student's architecture.
        model_cfg: dtype and MoE settings.
        parallel: the layout to simulate.
        world_size: its world size (sets the data-parallel groups).
        stage: the pipeline stage, 0 .. pp - 1.
        padded_vocab: Megatron's padded vocabulary at this TP.

    Returns:
        One `GPTModel` per virtual pipeline stage, every parameter on the meta device.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from mopd_megatron.student.model import gpt_model, transformer_config

    config = transformer_config(
        spec, model_cfg, parallel, use_cpu_initialization=True, perform_initialization=False
    )
    layers = get_gpt_layer_local_spec(
        num_experts=spec.num_experts or None, moe_grouped_gemm=False, qk_layernorm=True,
        normalization="RMSNorm",
    )
    groups = stand_in_groups(parallel, world_size, stage)
    chunks = []
    vpp = parallel.vpp or 1
    with torch.device("meta"):
        for vp_stage in range(vpp):
            chunks.append(gpt_model(
                spec, config, layers, padded_vocab,
                vp_stage=vp_stage if parallel.vpp else None,
                pre_process=stage == 0 and vp_stage == 0,
                post_process=stage == parallel.pp - 1 and vp_stage == vpp - 1,
                pg_collection=groups,
            ))
    return chunks


def count_params(chunks: list[torch.nn.Module]) -> tuple[int, int]:
    """(dense, expert) parameters of a rank's chunks; experts are the `local_experts` modules
    and grouped expert weights, the rest is dense."""
    dense = expert = 0
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            if ".experts." in name:
                expert += param.numel()
            else:
                dense += param.numel()
    return dense, expert


def meta_rank_params(
    spec: HFModelSpec,
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    world_size: int,
    padded_vocab: int,
) -> list[RankParams]:
    """Megatron's own parameter count of a rank of every pipeline stage, built on meta.

    Initialises a one-process `torch.distributed` world when none exists (and tears it down).

    Args:
        spec: the student's architecture.
        model_cfg: dtype and MoE settings.
        parallel: the layout to simulate.
        world_size: its world size.
        padded_vocab: Megatron's padded vocabulary at this TP.

    Returns:
        One `RankParams` per pipeline stage.
    """
    import torch.distributed as dist

    from mopd_megatron.student.parallel import init_parallel, teardown_parallel

    owns_world = not dist.is_initialized()
    if owns_world:
        init_parallel(ParallelConfig(), seed=0)
    try:
        counts = []
        for stage in range(parallel.pp):
            chunks = build_rank_on_meta(spec, model_cfg, parallel, world_size, stage, padded_vocab)
            counts.append(RankParams(*count_params(chunks)))
        return counts
    finally:
        if owns_world:
            teardown_parallel()
