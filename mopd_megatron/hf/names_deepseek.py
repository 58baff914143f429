"""HF conversion stage: the DeepSeek-V3 rows of the Megatron -> HF name map (`hf.names`).

Multi-Latent Attention, per layer (local spec name / Transformer Engine spec name -> HF):
- `input_layernorm` -> `input_layernorm` (MLA never fuses it into a linear);
- `linear_q_down_proj` -> `q_a_proj` [q_lora, H]; `q_layernorm` /
  `linear_q_up_proj.layer_norm_weight` -> `q_a_layernorm`; `linear_q_up_proj` -> `q_b_proj`
  [n (nope + rope), q_lora], column-parallel. Without query compression (`q_lora_rank: null`)
  `linear_q_proj` -> `q_proj` [n (nope + rope), H];
- `linear_kv_down_proj` -> `kv_a_proj_with_mqa` [kv_lora + rope, H]; `kv_layernorm` /
  `linear_kv_up_proj.layer_norm_weight` -> `kv_a_layernorm`; `linear_kv_up_proj` -> `kv_b_proj`
  [n (nope + v), kv_lora], column-parallel;
- `linear_proj` -> `o_proj` [H, n v], row-parallel.
The down-projections and latent norms are replicated over TP (a duplicated `TELinear` in the
TE spec, Megatron's duplicated `Linear` in the local one: `student.deepseek`). With
`rope_interleave: false` the RoPE rows of q and kv_a are re-ordered (`ParamMap.rope_halves`).
MoE layers add `mlp.shared_experts.linear_fc{1,2}` (dense TP, [gate; up]) ->
`mlp.shared_experts.{gate,up,down}_proj` and the fp32 buffer `mlp.router.expert_bias` ->
`mlp.gate.e_score_correction_bias`. MTP layers (`model.layers.{num_layers + k}`) have no rows:
the student does not build them (as transformers does not), import never reads them, and an
export has none, so it serves without MTP speculative decoding.
"""

from __future__ import annotations

from mopd_megatron.hf.names import ParamMap
from mopd_megatron.hf.spec import HFModelSpec


def mla_attention_rows(hf: str, spec: HFModelSpec) -> dict[str, ParamMap]:
    """Megatron MLA parameter suffix -> `ParamMap`, for the layer whose HF prefix is `hf`."""
    attn = f"{hf}self_attn."
    rope = spec.qk_rope_head_dim
    q_block, kv_block = spec.qk_nope_head_dim + rope, spec.kv_lora_rank + rope

    def halves(block: int) -> tuple[int, int] | None:
        return None if spec.rope_interleave else (block, rope)

    kv_norm = ParamMap((f"{attn}kv_a_layernorm.weight",))
    rows = {
        "input_layernorm.weight": ParamMap((f"{hf}input_layernorm.weight",)),
        "self_attention.linear_kv_down_proj.weight": ParamMap(
            (f"{attn}kv_a_proj_with_mqa.weight",), rope_halves=halves(kv_block)
        ),
        "self_attention.kv_layernorm.weight": kv_norm,
        "self_attention.linear_kv_up_proj.layer_norm_weight": kv_norm,
        "self_attention.linear_kv_up_proj.weight": ParamMap(
            (f"{attn}kv_b_proj.weight",), tp_dim=0
        ),
        "self_attention.linear_proj.weight": ParamMap((f"{attn}o_proj.weight",), tp_dim=1),
    }
    if not spec.q_lora_rank:
        rows["self_attention.linear_q_proj.weight"] = ParamMap(
            (f"{attn}q_proj.weight",), tp_dim=0, rope_halves=halves(q_block)
        )
        return rows
    q_norm = ParamMap((f"{attn}q_a_layernorm.weight",))
    rows.update(
        {
            "self_attention.linear_q_down_proj.weight": ParamMap((f"{attn}q_a_proj.weight",)),
            "self_attention.q_layernorm.weight": q_norm,
            "self_attention.linear_q_up_proj.layer_norm_weight": q_norm,
            "self_attention.linear_q_up_proj.weight": ParamMap(
                (f"{attn}q_b_proj.weight",), tp_dim=0, rope_halves=halves(q_block)
            ),
        }
    )
    return rows


def deepseek_moe_rows(hf: str, spec: HFModelSpec) -> dict[str, ParamMap]:
    """Shared experts and the router's expert bias (routed experts: `hf.names`)."""
    rows = {}
    if spec.n_shared_experts:
        shared = f"{hf}mlp.shared_experts."
        rows["mlp.shared_experts.linear_fc1.weight"] = ParamMap(
            (f"{shared}gate_proj.weight", f"{shared}up_proj.weight"), fuse="gate_up", tp_dim=0
        )
        rows["mlp.shared_experts.linear_fc2.weight"] = ParamMap(
            (f"{shared}down_proj.weight",), tp_dim=1
        )
    if spec.expert_bias:
        rows["mlp.router.expert_bias"] = ParamMap((f"{hf}mlp.gate.e_score_correction_bias",))
    return rows
