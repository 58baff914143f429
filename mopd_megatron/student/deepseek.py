"""Student stage: the Megatron-Core settings of a DeepSeek-V3-family student (MLA + DeepSeek MoE).

`deepseek_config_kwargs(spec)` adds to the Qwen3 settings of `student.model.transformer_config`,
which then builds an `MLATransformerConfig`. HF -> Megatron-Core 0.16.1:

- MLA: `q_lora_rank` (None for HF's null), `kv_lora_rank`, `qk_head_dim = qk_nope_head_dim`,
  `qk_pos_emb_head_dim = qk_rope_head_dim`, `v_head_dim`; `kv_channels = v_head_dim` (the
  local `DotProductAttention` sizes its output by it) and one query group per head.
  `qk_layernorm=True` is what builds the RMSNorms on the q and kv latents.
- RoPE: MLA builds its own (`rope_type` 'rope' or 'yarn' with HF's YaRN numbers) and
  de-interleaves the RoPE dims of q and k before rotating halves, which is HF's
  `rope_interleave: true` (for false the weights are permuted: `hf.layout`). Softmax scale
  `mscale(factor, mscale_all_dim)^2 / sqrt(qk_nope + qk_rope)`, as HF's.
- Dense first layers: `moe_layer_freq = [0] * k + [1] * (L - k)`; a list makes the block
  non-homogeneous, so `student.model` builds per-layer specs (`get_gpt_decoder_block_spec`).
- Shared experts: one `SharedExpertMLP` of width `n_shared_experts * moe_intermediate_size`
  (no gate), added to the routed output as HF does.
- Routing: fp32 router, sigmoid scores, `expert_bias` chooses the experts but not their
  weights, top-k renormalised, times `routed_scaling_factor`; group-limited routing only when
  it restricts the choice. The bias update rate is 0: the student keeps
  `e_score_correction_bias` as loaded (DeepSeek-V3 froze it for its last pre-training tokens
  too); override `moe_router_bias_update_rate` through `build_model(**config_overrides)`.

Without Transformer Engine, `mla_block_spec` fixes two things in 0.16.1's local MLA spec
(`gpt_layer_specs.get_gpt_layer_local_spec(multi_latent_attention=True)`):
- core attention: MLA passes TE's `k_channels` / `v_channels`, which the local
  `DotProductAttention` does not take (`MultiLatentAttention.__init__`): `LocalMLAAttention`;
- down-projections: as `ColumnParallelLinear` their outputs are re-assembled with
  `gather_from_tensor_model_parallel_region`, whose backward splits the gradient of the RoPE key
  `k_pos_emb` (shared by the heads of all TP ranks) instead of summing it, so TP > 1 trains on
  wrong gradients (the forward is right). They become Megatron's duplicated `Linear`
  (`post_training.modelopt.layers`), as the TE spec's duplicated `TELinear`: replicated
  weights, tagged `sequence_parallel` so their gradients are all-reduced over TP, and
  `k_pos_emb` gathered over the sequence with a summing backward.
"""

from __future__ import annotations

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.post_training.modelopt.layers import Linear
from megatron.core.transformer.dot_product_attention import DotProductAttention

from mopd_megatron.hf.spec import HFModelSpec


class LocalMLAAttention(DotProductAttention):
    """Megatron's local attention, taking the key/value head sizes MLA passes.

    Its computation already allows q/k heads (qk_nope + qk_rope) wider than v heads: only the
    output size uses `kv_channels`, which is `v_head_dim` for MLA students.
    """

    def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None, **kw):
        super().__init__(*args, **kw)
        if v_channels is not None and v_channels != self.config.kv_channels:
            raise ValueError(f"v_channels {v_channels} != kv_channels {self.config.kv_channels}")


def mla_block_spec(config, use_te: bool, vp_stage: int | None):
    """Per-layer specs of this stage's layers (dense first layers, then MoE) for MLA."""
    block = gpt_layer_specs.get_gpt_decoder_block_spec(
        config, use_te, normalization="RMSNorm", vp_stage=vp_stage
    )
    if not use_te:
        for layer in block.layer_specs:
            attention = layer.submodules.self_attention.submodules
            attention.core_attention = LocalMLAAttention
            attention.linear_q_down_proj = attention.linear_kv_down_proj = Linear
    return block


def deepseek_config_kwargs(spec: HFModelSpec) -> dict:
    """The `MLATransformerConfig` fields that differ from a Qwen3 student's (see above)."""
    yarn = spec.yarn
    kwargs = {
        "multi_latent_attention": True,
        "q_lora_rank": spec.q_lora_rank or None,
        "kv_lora_rank": spec.kv_lora_rank,
        "qk_head_dim": spec.qk_nope_head_dim,
        "qk_pos_emb_head_dim": spec.qk_rope_head_dim,
        "v_head_dim": spec.v_head_dim,
        "kv_channels": spec.v_head_dim,
        "num_query_groups": spec.num_attention_heads,
        "rope_type": "yarn" if yarn else "rope",
        "rotary_base": spec.rope_theta,
        "rotary_scaling_factor": yarn.factor if yarn else 1.0,
        "original_max_position_embeddings": (
            yarn.original_max_position_embeddings if yarn else spec.max_position_embeddings
        ),
        "beta_fast": yarn.beta_fast if yarn else 32.0,
        "beta_slow": yarn.beta_slow if yarn else 1.0,
        "mscale": yarn.mscale if yarn else 1.0,
        "mscale_all_dim": yarn.mscale_all_dim if yarn else 0.0,
    }
    if not spec.is_moe:
        return kwargs
    grouped = 1 < spec.n_group and spec.topk_group < spec.n_group
    kwargs.update(
        moe_layer_freq=spec.moe_layer_pattern if spec.first_k_dense_replace else 1,
        moe_shared_expert_intermediate_size=(
            spec.n_shared_experts * spec.moe_intermediate_size or None
        ),
        moe_router_score_function=spec.score_function,
        moe_router_enable_expert_bias=spec.expert_bias,
        moe_router_bias_update_rate=0.0,
        moe_router_dtype="fp32",
        moe_router_num_groups=spec.n_group if grouped else None,
        moe_router_group_topk=spec.topk_group if grouped else None,
        moe_router_topk_scaling_factor=(
            spec.routed_scaling_factor if spec.routed_scaling_factor != 1.0 else None
        ),
    )
    return kwargs
