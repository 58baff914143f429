"""HF conversion stage: pure tensor re-layouts between HF tensors and Megatron-Core shards.

No Megatron import, no process group: each function maps tensors to tensors and is tested
exactly (`torch.equal`). Shapes use H = hidden, np/ng = query heads / query groups (KV heads),
hn = head_dim, I = MLP width, V = vocabulary, and T = the shard count (TP or expert-TP).

- QKV: Megatron's fused `linear_qkv.weight` [(np + 2 ng) hn, H] holds, for each query group g
  in order, its np/ng query heads, then K head g, then V head g.
- fc1: `[gate; up]` [2I, H]. Under T shards, shard i is `[gate_i; up_i]` (gate and up are split
  separately), not the i-th contiguous slice of `[gate; up]`.
- Column-parallel tensors (qkv, fc1, embedding, output layer) split on dim 0, row-parallel ones
  (attention output, fc2) on dim 1; everything else is replicated.
- Vocabulary rows are zero-padded to a multiple of `make_vocab_size_divisible_by * TP`.
- Experts: EP rank r holds the global experts [r E/EP, (r+1) E/EP) as local 0..E/EP-1.
- MLA RoPE rows: Megatron's MLA de-interleaves the d RoPE dims of q and k (`rope_utils`,
  `multi_latent_attention=True`: x[0::2], x[1::2]) before rotating halves, so DeepSeek's
  interleaved-pair weights load as they are; a checkpoint with `rope_interleave: false` (halves)
  gets its RoPE rows re-ordered as pairs (`rope_halves_to_pairs`) on import.
"""

from __future__ import annotations

import math

import torch


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int
) -> torch.Tensor:
    """HF q/k/v projections -> Megatron's grouped `linear_qkv`.

    Args:
        q: [np * hn, ...] (weight [np hn, H] or bias [np hn]).
        k: [ng * hn, ...].
        v: [ng * hn, ...].
        num_query_groups: ng.

    Returns:
        [(np + 2 ng) hn, ...], grouped per query group as [q heads of g; k_g; v_g].
    """
    ng = num_query_groups
    rest = q.shape[1:]
    groups = (q.reshape(ng, -1, *rest), k.reshape(ng, -1, *rest), v.reshape(ng, -1, *rest))
    return torch.cat(groups, dim=1).reshape(-1, *rest)


def split_qkv(
    qkv: torch.Tensor, num_query_groups: int, num_attention_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `merge_qkv`: Megatron `linear_qkv` [(np + 2 ng) hn, ...] -> (q, k, v)."""
    ng, heads_per_group = num_query_groups, num_attention_heads // num_query_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(ng, heads_per_group + 2, -1, *rest)
    q, k, v = grouped.split([heads_per_group, 1, 1], dim=1)
    return (
        q.reshape(-1, *rest).contiguous(),
        k.reshape(-1, *rest).contiguous(),
        v.reshape(-1, *rest).contiguous(),
    )


def rope_halves_to_pairs(weight: torch.Tensor, block: int, rope_dim: int) -> torch.Tensor:
    """Re-order the RoPE rows of each `block`-row group from halves to interleaved pairs.

    Args:
        weight: [n * block, ...]; the last `rope_dim` rows of every block are RoPE rows laid
            out as halves [a_0 .. a_{d/2-1}, b_0 .. b_{d/2-1}] (a_i, b_i rotate together).
        block: rows per group (per head for q: qk_nope + qk_rope; kv_lora + qk_rope for kv).
        rope_dim: d.

    Returns:
        The same rows with each RoPE part as pairs [a_0, b_0, a_1, b_1, ...].
    """
    head, rope = _rope_split(weight, block, rope_dim)
    rope = rope.unflatten(1, (2, rope_dim // 2)).transpose(1, 2).flatten(1, 2)
    return torch.cat([head, rope], dim=1).reshape(weight.shape)


def rope_pairs_to_halves(weight: torch.Tensor, block: int, rope_dim: int) -> torch.Tensor:
    """Inverse of `rope_halves_to_pairs`."""
    head, rope = _rope_split(weight, block, rope_dim)
    rope = rope.unflatten(1, (rope_dim // 2, 2)).transpose(1, 2).flatten(1, 2)
    return torch.cat([head, rope], dim=1).reshape(weight.shape)


def _rope_split(weight: torch.Tensor, block: int, rope_dim: int):
    grouped = weight.reshape(-1, block, *weight.shape[1:])
    return grouped.split([block - rope_dim, rope_dim], dim=1)


def split_tp(
    full: torch.Tensor, dim: int | None, rank: int, size: int, gated: bool = False
) -> torch.Tensor:
    """The `rank`-th of `size` shards of a full (unsharded) Megatron tensor.

    Args:
        full: the tensor in its TP=1 Megatron layout.
        dim: split dimension (0 column-parallel, 1 row-parallel, None replicated).
        rank: shard index.
        size: shard count (TP, or expert-TP for experts).
        gated: `full` is `[gate; up]`; gate and up are split separately.

    Returns:
        The shard (a view where possible).
    """
    if dim is None or size == 1:
        return full
    if gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    if full.shape[dim] % size:
        raise ValueError(
            f"dim {dim} of shape {tuple(full.shape)} is not divisible by {size} shards"
        )
    return full.chunk(size, dim=dim)[rank]


def merge_tp(shards: list[torch.Tensor], dim: int | None, gated: bool = False) -> torch.Tensor:
    """Inverse of `split_tp`: the full tensor from all shards in rank order."""
    if dim is None or len(shards) == 1:
        return shards[0]
    if gated:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padded vocabulary: the next multiple of `divisible_by * tp`."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Zero-pad the vocabulary rows (dim 0) of an embedding or output layer to `padded_size`."""
    if weight.shape[0] > padded_size:
        raise ValueError(
            f"vocabulary of {weight.shape[0]} rows exceeds the padded size {padded_size}"
        )
    pad = weight.new_zeros(padded_size - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)


def truncate_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop the padded vocabulary rows (dim 0) again."""
    return weight[:vocab_size]


def local_experts(ep_rank: int, ep: int, num_experts: int) -> range:
    """The global expert ids held by EP rank `ep_rank` (local id i is global `start + i`)."""
    if num_experts % ep:
        raise ValueError(f"{num_experts} experts are not divisible by ep = {ep}")
    per_rank = num_experts // ep
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)
