"""HF conversion stage: the DeepSeek-V3 fields of a `config.json` -> `HFModelSpec` fields.

Read here (transformers' `DeepseekV3Config`, and the keys of DeepSeek's own remote-code
configs): MLA ranks and head dims, `rope_interleave`, YaRN RoPE, `first_k_dense_replace`,
shared experts, sigmoid routing with `e_score_correction_bias`, group-limited routing,
`routed_scaling_factor` and the MTP module count.

Each option Megatron-Core 0.16.1 computes differently from transformers is an `HFConfigError`:
- `norm_topk_prob: false` with top-k > 1: Megatron's sigmoid router always renormalises
  (`moe_utils.topk_routing_with_score_function`).
- group-limited routing where top-k != 2 * topk_group: HF scores a group by the sum of its top
  2 expert scores, Megatron by its top (top-k / topk_group) (`moe_utils.group_limited_topk`).
- YaRN with `attention_factor`, `truncate: false`, `partial_rotary_factor`, or `mscale_all_dim`
  without `mscale`: Megatron's MLA YaRN has no such inputs (`YarnRotaryEmbedding`).
- RoPE types other than default and yarn; `num_key_value_heads != num_attention_heads`.
MTP modules (`num_nextn_predict_layers`) are recorded but not built, as transformers does.
"""

from __future__ import annotations

from collections.abc import Callable

from mopd_megatron.hf.spec import HFConfigError, YarnRope, reject, rope_type


def deepseek_fields(get: Callable, source: str) -> dict:
    """The DeepSeek-V3 `HFModelSpec` fields of a config (see the module docstring).

    Args:
        get: `get(*keys, default=None, required=True)` over the parsed config.json.
        source: the file, for error messages.

    Returns:
        Keyword arguments for `HFModelSpec` (MoE, MLA and routing fields).

    Raises:
        HFConfigError: an option Megatron-Core cannot reproduce exactly.
    """
    heads = int(get("num_attention_heads"))
    reject(source, "num_key_value_heads", int(get("num_key_value_heads", default=heads)), heads)
    reject(source, "scoring_func", get("scoring_func", default="sigmoid"), "sigmoid")
    reject(source, "topk_method", get("topk_method", default="noaux_tc"), "noaux_tc")
    reject(source, "moe_layer_freq", get("moe_layer_freq", default=1), 1)
    num_layers = int(get("num_hidden_layers"))
    experts = int(get("n_routed_experts", "num_local_experts"))
    topk = int(get("num_experts_per_tok"))
    n_group = int(get("n_group", default=1) or 1)
    topk_group = int(get("topk_group", default=1) or 1)
    norm = bool(get("norm_topk_prob", default=True))
    if not norm and topk > 1:
        raise HFConfigError(
            f"{source}: 'norm_topk_prob' = False is not supported with num_experts_per_tok > 1 "
            "(Megatron-Core's sigmoid router always renormalises the top-k scores)"
        )
    if experts % n_group or topk_group > n_group:
        raise HFConfigError(
            f"{source}: 'n_group' = {n_group} must divide 'n_routed_experts' = {experts} and "
            f"be >= 'topk_group' = {topk_group}"
        )
    if 1 < n_group and topk_group < n_group and topk != 2 * topk_group:
        raise HFConfigError(
            f"{source}: group-limited routing with 'num_experts_per_tok' = {topk} and "
            f"'topk_group' = {topk_group} is not supported: HF scores a group by its top-2 "
            f"experts, Megatron-Core by its top num_experts_per_tok / topk_group = "
            f"{topk // topk_group} (supported: num_experts_per_tok == 2 * topk_group)"
        )
    first_dense = int(get("first_k_dense_replace", default=0) or 0)
    if first_dense > num_layers:
        raise HFConfigError(
            f"{source}: 'first_k_dense_replace' = {first_dense} exceeds "
            f"'num_hidden_layers' = {num_layers}"
        )
    return {
        "num_experts": experts,
        "num_experts_per_tok": topk,
        "moe_intermediate_size": int(get("moe_intermediate_size")),
        "norm_topk_prob": norm,
        "q_lora_rank": int(get("q_lora_rank", required=False) or 0),
        "kv_lora_rank": int(get("kv_lora_rank")),
        "qk_nope_head_dim": int(get("qk_nope_head_dim")),
        "qk_rope_head_dim": int(get("qk_rope_head_dim")),
        "v_head_dim": int(get("v_head_dim")),
        "rope_interleave": bool(get("rope_interleave", default=True)),
        "yarn": _yarn(get, source),
        "first_k_dense_replace": first_dense,
        "n_shared_experts": int(get("n_shared_experts", default=0) or 0),
        "score_function": "sigmoid",
        "expert_bias": True,
        "n_group": n_group,
        "topk_group": topk_group,
        "routed_scaling_factor": float(get("routed_scaling_factor", default=1.0)),
        "num_mtp_layers": int(get("num_nextn_predict_layers", "num_mtp_layers", default=0)),
    }


def _yarn(get: Callable, source: str) -> YarnRope | None:
    """HF's YaRN parameters as Megatron's MLA takes them (None for plain RoPE)."""
    kind = rope_type(get)
    if kind == "default":
        return None
    reject(source, "rope_parameters.rope_type", kind, "yarn")

    def param(name, default=None):
        keys = (f"rope_parameters.{name}", f"rope_scaling.{name}")
        return get(*keys, default=default, required=False)

    for name, supported in (("attention_factor", None), ("truncate", True)):
        reject(source, f"rope_parameters.{name}", param(name, default=supported), supported)
    reject(source, "partial_rotary_factor", float(get("partial_rotary_factor", default=1.0)), 1.0)
    original = int(
        get(
            "rope_parameters.original_max_position_embeddings",
            "rope_scaling.original_max_position_embeddings",
        )
    )
    factor = param("factor", default=float(get("max_position_embeddings")) / original)
    mscale, mscale_all_dim = param("mscale", default=0.0), param("mscale_all_dim", default=0.0)
    if mscale_all_dim and not mscale:
        raise HFConfigError(
            f"{source}: YaRN 'mscale_all_dim' = {mscale_all_dim} without 'mscale' is not "
            "supported (Megatron-Core's YaRN takes the attention factor from both)"
        )
    return YarnRope(
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=float(param("beta_fast", default=0.0) or 32.0),
        beta_slow=float(param("beta_slow", default=0.0) or 1.0),
        # HF: attention factor mscale(f, mscale) / mscale(f, mscale_all_dim) when both are
        # set, else mscale(f, 1); Megatron always takes the ratio, so mscale = 1 when unset.
        mscale=float(mscale) if mscale_all_dim else 1.0,
        mscale_all_dim=float(mscale_all_dim or 0.0),
    )
