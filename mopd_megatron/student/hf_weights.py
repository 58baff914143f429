"""Student stage: HF tensors <-> the built Megatron-Core model at any TP/PP/EP/ETP/DP layout.

The per-architecture name and layout rules live in `hf/`; this module applies them to this
rank's parameters with Megatron's process groups (so it lives with the student).

Import (`load_hf_weights`): every rank reads, for each of its own parameters, only the HF
tensors that parameter needs, re-lays them out (`hf.layout`) and copies its shard in.

Export (`export_hf_weights`): a streaming iterator of buckets `[(hf_name, tensor), ...]`.
All ranks must iterate it together (it runs collectives). Shards are all-gathered over TP
(expert-TP for experts), experts over EP, and each pipeline stage broadcasts its buckets to
the other stages, so **every rank yields the same buckets, in the same order, holding full
HF tensors** (on the parameters' device, in their dtype; padded vocabulary rows removed; no
`lm_head.weight` for tied embeddings). A bucket closes before it would pass `bucket_bytes`.

Persistent buffers travel like parameters: the MoE router's `expert_bias` (DeepSeek-V3's
`e_score_correction_bias`) is kept in fp32 by Megatron even in a bf16 model, and so exported.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from mopd_megatron.hf.layout import (
    merge_qkv,
    merge_tp,
    pad_vocab,
    rope_halves_to_pairs,
    rope_pairs_to_halves,
    split_qkv,
    split_tp,
    truncate_vocab,
)
from mopd_megatron.hf.names import ParamMap, global_param_name, hf_param_map
from mopd_megatron.hf.safetensors_io import HFCheckpointError, HFCheckpointReader
from mopd_megatron.hf.spec import HFModelSpec, read_hf_config


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The `GPTModel` inside a model chunk (through `Float16Module` and DDP wrappers)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_named_parameters(
    chunks: list[torch.nn.Module], spec: HFModelSpec, ep_rank: int | None = None
) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters and persistent buffers under global names (global layer index
    and expert id).

    Args:
        chunks: the model chunks of this rank.
        spec: the HF architecture (expert count).
        ep_rank: the EP rank whose expert ids to use (default: this rank's).
    """
    from megatron.core import parallel_state

    ep = parallel_state.get_expert_model_parallel_world_size()
    if ep_rank is None:
        ep_rank = parallel_state.get_expert_model_parallel_rank()
    per_rank = spec.num_experts // ep if spec.is_moe else 0
    for chunk in chunks:
        model = unwrap(chunk)
        numbers = [layer.layer_number for layer in model.decoder.layers]
        persistent = model.state_dict(keep_vars=True)
        buffers = [(n, b) for n, b in model.named_buffers() if n in persistent]
        for name, param in [*model.named_parameters(), *buffers]:
            yield global_param_name(name, numbers, ep_rank * per_rank), param


def _shard_group(pmap: ParamMap):
    """(rank, size, group) of the tensor-parallel group that splits this parameter."""
    from megatron.core import parallel_state as ps

    if pmap.expert:
        return (
            ps.get_expert_tensor_parallel_rank(),
            ps.get_expert_tensor_parallel_world_size(),
            ps.get_expert_tensor_parallel_group(),
        )
    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_tensor_model_parallel_group(),
    )


@torch.no_grad()
def load_hf_weights(
    chunks: list[torch.nn.Module], hf_dir: str | Path, spec: HFModelSpec | None = None
) -> None:
    """Copy an HF checkpoint into this rank's model chunks (each rank reads only its tensors).

    Args:
        chunks: the model chunks (`student.model.build_model`).
        hf_dir: the HF folder.
        spec: its spec (read from `hf_dir/config.json` when None).

    Raises:
        HFConfigError / HFCheckpointError: missing folder, file or tensor, or wrong shape.
    """
    spec = spec or read_hf_config(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    for chunk in chunks:  # a bf16 model's router expert bias is bf16 until its first forward
        for module in unwrap(chunk).modules():
            if hasattr(module, "_maintain_float32_expert_bias"):
                module._maintain_float32_expert_bias()
    for name, param in global_named_parameters(chunks, spec):
        pmap = hf_param_map(name, spec)
        tensors = [reader.get(n) for n in pmap.hf_names]
        rank, size, _ = _shard_group(pmap)
        where = ", ".join(
            f"{n} {tuple(t.shape)} in {reader.file_of(n).name}"
            for n, t in zip(pmap.hf_names, tensors)
        )
        try:
            full = _to_megatron(tensors, pmap, spec, padded_rows=param.shape[0] * size)
            shard = split_tp(full, pmap.tp_dim, rank, size, gated=pmap.fuse == "gate_up")
        except (RuntimeError, ValueError) as err:
            raise HFCheckpointError(
                f"{reader.source}: cannot build {name} from {where}: {err}"
            ) from None
        if shard.shape != param.shape:
            raise HFCheckpointError(
                f"{reader.source}: wrong shape for {where}: Megatron's {name} "
                f"shard is {tuple(param.shape)}, the HF tensors give {tuple(shard.shape)}"
            )
        param.copy_(shard)


def _to_megatron(
    tensors: list[torch.Tensor], pmap: ParamMap, spec: HFModelSpec, padded_rows: int
) -> torch.Tensor:
    if pmap.fuse == "qkv":
        return merge_qkv(*tensors, spec.num_key_value_heads)
    if pmap.fuse == "gate_up":
        return torch.cat(tensors, dim=0)
    if pmap.rope_halves:
        return rope_halves_to_pairs(tensors[0], *pmap.rope_halves)
    return pad_vocab(tensors[0], padded_rows) if pmap.vocab else tensors[0]


def _to_hf(full: torch.Tensor, pmap: ParamMap, spec: HFModelSpec) -> list[tuple[str, torch.Tensor]]:
    if pmap.fuse == "qkv":
        parts = split_qkv(full, spec.num_key_value_heads, spec.num_attention_heads)
    elif pmap.fuse == "gate_up":
        parts = full.chunk(2, dim=0)
    elif pmap.rope_halves:
        parts = [rope_pairs_to_halves(full, *pmap.rope_halves)]
    else:
        parts = [truncate_vocab(full, spec.vocab_size) if pmap.vocab else full]
    return list(zip(pmap.hf_names, parts))


def _all_gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    size = dist.get_world_size(group)
    if size == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(out, tensor.contiguous(), group=group)
    return out


def _stage_tensors(
    chunks: list[torch.nn.Module], spec: HFModelSpec
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF tensors of this pipeline stage (collectives over TP, expert-TP and EP)."""
    from megatron.core import parallel_state as ps

    ep_group = ps.get_expert_model_parallel_group()
    ep_ranks = range(ps.get_expert_model_parallel_world_size())
    names_by_ep_rank = [[n for n, _ in global_named_parameters(chunks, spec, r)] for r in ep_ranks]
    for i, (name, param) in enumerate(global_named_parameters(chunks, spec)):
        if name == "output_layer.weight" and spec.tie_word_embeddings:
            continue
        pmap = hf_param_map(name, spec)
        _, _, group = _shard_group(pmap)
        full = merge_tp(
            _all_gather(param.detach(), group), pmap.tp_dim, gated=pmap.fuse == "gate_up"
        )
        if not pmap.expert:
            yield from _to_hf(full, pmap, spec)
            continue
        for r, expert in enumerate(_all_gather(full, ep_group)):
            yield from _to_hf(expert, hf_param_map(names_by_ep_rank[r][i], spec), spec)


def export_hf_weights(
    chunks: list[torch.nn.Module], spec: HFModelSpec, bucket_bytes: int = 512 << 20
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Stream the model as full HF tensors; every rank must iterate (see the module docstring).

    Args:
        chunks: the model chunks of this rank.
        spec: the HF architecture to export to.
        bucket_bytes: bound on a bucket's bytes (a larger tensor travels alone).

    Yields:
        Buckets `[(hf_name, tensor), ...]`, identical on every rank.
    """
    from megatron.core import parallel_state as ps

    pp_group = ps.get_pipeline_model_parallel_group()
    pp_rank, pp_size = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
    )
    device = next(chunks[0].parameters()).device
    for stage in range(pp_size):
        src = dist.get_global_rank(pp_group, stage) if pp_size > 1 else dist.get_rank()
        if stage == pp_rank:
            for bucket in _buckets(_stage_tensors(chunks, spec), bucket_bytes):
                if pp_size > 1:
                    _broadcast_bucket(bucket, src, pp_group, device)
                yield bucket
            if pp_size > 1:
                _broadcast_bucket(None, src, pp_group, device)
        else:
            while (
                bucket := _broadcast_bucket(None, src, pp_group, device, receive=True)
            ) is not None:
                yield bucket


def _buckets(tensors: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list]:
    bucket, size = [], 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def _broadcast_bucket(bucket, src: int, group, device, receive: bool = False):
    """Send `bucket` (None = end of stage) from `src` over the pipeline group, or receive one."""
    meta = [None if receive or bucket is None else [(n, t.shape, t.dtype) for n, t in bucket]]
    dist.broadcast_object_list(meta, src=src, group=group)
    if meta[0] is None:
        return None
    if not receive:
        for _, tensor in bucket:
            dist.broadcast(tensor.contiguous(), src=src, group=group)
        return bucket
    out = []
    for name, shape, dtype in meta[0]:
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=src, group=group)
        out.append((name, tensor))
    return out
