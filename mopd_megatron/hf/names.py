"""HF conversion stage: which HF tensors make up each Megatron-Core parameter, and how.

A Megatron parameter is named globally here: the layer index is the global one
(`layer_number - 1`) and the expert index the global expert id (EP rank offset added). Both
naming flavours are accepted: the local spec (`input_layernorm`, `pre_mlp_layernorm`,
`experts.local_experts.{e}.linear_fc1.weight`) and the Transformer Engine spec (norms fused
into `linear_qkv` / `linear_fc1` as `layer_norm_weight`, grouped experts
`experts.linear_fc1.weight{e}`). HF names are those of transformers' Qwen3 / Qwen3-MoE /
DeepSeek-V3 with classic per-expert keys; `hf.safetensors_io` also reads the fused expert layout.
The DeepSeek-V3 rows (MLA attention, shared experts, router expert bias) are in
`hf.names_deepseek`; its dense first layers use the dense-MLP rows here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mopd_megatron.hf.spec import HFModelSpec


@dataclass(frozen=True)
class ParamMap:
    """How one Megatron parameter is assembled from HF tensors."""

    hf_names: tuple[str, ...]
    fuse: str | None = None
    """'qkv' (grouped interleave of q, k, v), 'gate_up' ([gate; up]) or None (one tensor)."""
    tp_dim: int | None = None
    """Split dimension under TP: 0 column-parallel, 1 row-parallel, None replicated."""
    expert: bool = False
    """A routed-expert weight: split by expert-TP and owned by one EP rank."""
    vocab: bool = False
    """Vocabulary rows on dim 0: zero-padded to Megatron's padded size."""
    rope_halves: tuple[int, int] | None = None
    """(block, rope_dim): the HF RoPE rows are halves, Megatron's are interleaved pairs
    (`layout.rope_halves_to_pairs`)."""


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(
    r"mlp\.experts\.(?:local_experts\.(\d+)\.linear_fc(\d)\.weight|"
    r"linear_fc(\d)\.weight(\d+))$"
)
_LOCAL_EXPERT = re.compile(
    r"(\.experts\.local_experts\.)(\d+)(\.)|(\.experts\.linear_fc\d\.weight)(\d+)$"
)


def global_param_name(local_name: str, layer_numbers: list[int], expert_offset: int) -> str:
    """A chunk-local Megatron parameter name -> its global name.

    Args:
        local_name: from `GPTModel.named_parameters()` of one chunk on one rank.
        layer_numbers: `layer_number` (1-based, global) of the chunk's `decoder.layers[i]`.
        expert_offset: the first global expert id of this EP rank (`ep_rank * E / EP`).

    Returns:
        The name with the global layer index (`layer_number - 1`) and global expert ids.
    """
    match = _LAYER.fullmatch(local_name)
    if match is None:
        return local_name
    index, rest = match.groups()

    def shift(m: re.Match) -> str:
        if m.group(2) is not None:
            return f"{m.group(1)}{int(m.group(2)) + expert_offset}{m.group(3)}"
        return f"{m.group(4)}{int(m.group(5)) + expert_offset}"

    rest = _LOCAL_EXPERT.sub(shift, "." + rest)[1:]
    return f"decoder.layers.{layer_numbers[int(index)] - 1}.{rest}"


def hf_param_map(name: str, spec: HFModelSpec) -> ParamMap:
    """The HF source of the Megatron parameter with global name `name`.

    Args:
        name: e.g. `decoder.layers.3.self_attention.linear_qkv.weight`,
            `decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight`.
        spec: the HF architecture (tied embeddings).

    Returns:
        The `ParamMap`.

    Raises:
        KeyError: a parameter this converter does not know.
    """
    if name == "embedding.word_embeddings.weight":
        return ParamMap(("model.embed_tokens.weight",), tp_dim=0, vocab=True)
    if name == "output_layer.weight":
        # Tied: the last stage's copy (PP > 1) reads the embedding, as Megatron's own
        # sharded_state_dict maps it onto the embedding's checkpoint key.
        source = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
        return ParamMap((source,), tp_dim=0, vocab=True)
    if name == "decoder.final_layernorm.weight":
        return ParamMap(("model.norm.weight",))
    match = _LAYER.fullmatch(name)
    if match is None:
        raise KeyError(f"no HF mapping for Megatron parameter {name!r}")
    layer, rest = match.groups()
    hf = f"model.layers.{layer}."
    expert = _EXPERT.fullmatch(rest)
    if expert:
        local_e, local_fc, grouped_fc, grouped_e = expert.groups()
        e, fc = (local_e, local_fc) if local_e is not None else (grouped_e, grouped_fc)
        prefix = f"{hf}mlp.experts.{e}."
        if fc == "1":
            return ParamMap(
                (f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight"),
                fuse="gate_up",
                tp_dim=0,
                expert=True,
            )
        return ParamMap((f"{prefix}down_proj.weight",), tp_dim=1, expert=True)
    from mopd_megatron.hf.names_deepseek import deepseek_moe_rows, mla_attention_rows

    table = mla_attention_rows(hf, spec) if spec.is_mla else _gqa_attention_rows(hf)
    table.update(_mlp_rows(hf))
    table.update(deepseek_moe_rows(hf, spec))
    if rest not in table:
        raise KeyError(f"no HF mapping for Megatron parameter {name!r}")
    return table[rest]


def _gqa_attention_rows(hf: str) -> dict[str, ParamMap]:
    """Qwen3 attention: fused grouped QKV, per-head q/k RMSNorm."""
    attn = f"{hf}self_attn."
    return {
        "input_layernorm.weight": ParamMap((f"{hf}input_layernorm.weight",)),
        "self_attention.linear_qkv.layer_norm_weight": ParamMap((f"{hf}input_layernorm.weight",)),
        "self_attention.linear_qkv.weight": ParamMap(
            (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"),
            fuse="qkv",
            tp_dim=0,
        ),
        "self_attention.q_layernorm.weight": ParamMap((f"{attn}q_norm.weight",)),
        "self_attention.k_layernorm.weight": ParamMap((f"{attn}k_norm.weight",)),
        "self_attention.linear_proj.weight": ParamMap((f"{attn}o_proj.weight",), tp_dim=1),
    }


def _mlp_rows(hf: str) -> dict[str, ParamMap]:
    """Dense MLP (with its pre-MLP norm in either spec) and the MoE router weight."""
    return {
        "pre_mlp_layernorm.weight": ParamMap((f"{hf}post_attention_layernorm.weight",)),
        "mlp.linear_fc1.layer_norm_weight": ParamMap((f"{hf}post_attention_layernorm.weight",)),
        "mlp.linear_fc1.weight": ParamMap(
            (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), fuse="gate_up", tp_dim=0
        ),
        "mlp.linear_fc2.weight": ParamMap((f"{hf}mlp.down_proj.weight",), tp_dim=1),
        "mlp.router.weight": ParamMap((f"{hf}mlp.gate.weight",)),
    }
