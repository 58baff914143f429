"""DeepSeek-V3 config reading, name map, RoPE row order, FP8 reading and student settings, with
the errors for what Megatron-Core 0.16.1 cannot reproduce (no process group, no torchrun)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mopd_megatron.config import ModelConfig, ParallelConfig
from mopd_megatron.hf.layout import rope_halves_to_pairs, rope_pairs_to_halves
from mopd_megatron.hf.names import hf_param_map
from mopd_megatron.hf.safetensors_io import HFCheckpointError, HFCheckpointReader
from mopd_megatron.hf.spec import (
    HFConfigError,
    YarnRope,
    read_hf_config,
    spec_from_dict,
)

# deepseek-ai/DeepSeek-V3's config.json (transformers-4 / remote-code spelling), minus auto_map.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_reads_the_deepseek_v3_release_config():
    spec = spec_from_dict(DEEPSEEK_V3)
    assert spec.model_type == "deepseek_v3" and spec.is_moe and spec.is_mla
    assert (spec.q_lora_rank, spec.kv_lora_rank, spec.qk_nope_head_dim) == (1536, 512, 128)
    assert (spec.qk_rope_head_dim, spec.v_head_dim, spec.rope_interleave) == (64, 128, True)
    assert spec.yarn == YarnRope(40.0, 4096, 32.0, 1.0, 1.0, 1.0)
    assert spec.moe_layer_pattern == [0] * 3 + [1] * 58
    assert (spec.num_experts, spec.num_experts_per_tok, spec.n_shared_experts) == (256, 8, 1)
    assert (spec.n_group, spec.topk_group, spec.routed_scaling_factor) == (8, 4, 2.5)
    assert (spec.score_function, spec.expert_bias, spec.num_mtp_layers) == ("sigmoid", True, 1)
    # transformers-5 spelling of the same config
    cfg5 = {k: v for k, v in DEEPSEEK_V3.items() if k not in ("rope_scaling", "rope_theta")}
    yarn = {k: v for k, v in DEEPSEEK_V3["rope_scaling"].items() if k != "type"}
    cfg5["rope_parameters"] = {**yarn, "rope_type": "yarn", "rope_theta": 1e4}
    assert spec_from_dict(cfg5) == spec


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"norm_topk_prob": False}, "norm_topk_prob"),
        ({"num_experts_per_tok": 6}, "group-limited routing"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"topk_method": "group_limited_greedy"}, "topk_method"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"num_key_value_heads": 8}, "num_key_value_heads"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "attention_factor": 1.2}}, "attention"),
        ({"rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "truncate": False}}, "truncate"),
        ({"rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "mscale": None}}, "without 'mscale'"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
        ({"first_k_dense_replace": 62}, "first_k_dense_replace"),
    ],
)
def test_unsupported_options_name_file_and_key(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**DEEPSEEK_V3, **change}))
    with pytest.raises(HFConfigError, match=message) as err:
        read_hf_config(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def test_mla_names_local_and_te_specs_agree():
    spec = spec_from_dict(DEEPSEEK_V3)
    pairs = [
        ("q_layernorm.weight", "linear_q_up_proj.layer_norm_weight"),
        ("kv_layernorm.weight", "linear_kv_up_proj.layer_norm_weight"),
    ]
    for local, te in [(f"self_attention.{a}", f"self_attention.{b}") for a, b in pairs] + [
        ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
    ]:
        assert hf_param_map(f"decoder.layers.5.{local}", spec) == hf_param_map(
            f"decoder.layers.5.{te}", spec
        )
    attn = "model.layers.5.self_attn."
    expected = {
        "self_attention.q_layernorm.weight": (f"{attn}q_a_layernorm.weight",),
        "self_attention.linear_q_down_proj.weight": (f"{attn}q_a_proj.weight",),
        "self_attention.linear_q_up_proj.weight": (f"{attn}q_b_proj.weight",),
        "self_attention.linear_kv_down_proj.weight": (f"{attn}kv_a_proj_with_mqa.weight",),
        "self_attention.linear_kv_up_proj.weight": (f"{attn}kv_b_proj.weight",),
        "mlp.router.expert_bias": ("model.layers.5.mlp.gate.e_score_correction_bias",),
        "mlp.shared_experts.linear_fc1.weight": (
            "model.layers.5.mlp.shared_experts.gate_proj.weight",
            "model.layers.5.mlp.shared_experts.up_proj.weight",
        ),
    }
    for name, hf in expected.items():
        assert hf_param_map(f"decoder.layers.5.{name}", spec).hf_names == hf
    down = hf_param_map("decoder.layers.5.self_attention.linear_kv_down_proj.weight", spec)
    assert (down.tp_dim, down.rope_halves) == (None, None)  # replicated over TP
    no_q = spec_from_dict({**DEEPSEEK_V3, "q_lora_rank": None, "rope_interleave": False})
    q = hf_param_map("decoder.layers.0.self_attention.linear_q_proj.weight", no_q)
    assert (q.hf_names, q.rope_halves) == ((f"{attn.replace('5', '0')}q_proj.weight",), (192, 64))
    with pytest.raises(KeyError, match="no HF mapping"):
        hf_param_map("decoder.layers.0.self_attention.linear_q_up_proj.weight", no_q)


def test_rope_rows_halves_to_pairs():
    block, rope = 6, 4  # per head: 2 non-RoPE rows, then a_0 a_1 b_0 b_1
    weight = torch.randn(3 * block, 5)
    pairs = rope_halves_to_pairs(weight, block, rope)
    for head in range(3):
        h = weight[head * block : (head + 1) * block]
        p = pairs[head * block : (head + 1) * block]
        assert torch.equal(p[:2], h[:2])
        assert torch.equal(p[2::2], h[2:4]) and torch.equal(p[3::2], h[4:6])
    assert torch.equal(rope_pairs_to_halves(pairs, block, rope), weight)


def test_fp8_weights_are_dequantized_per_block(tmp_path):
    weight = torch.randn(5, 7).to(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0, 0.5], [3.0, 0.25]])  # blocks of 4 x 4: partial at both ends
    save_file(
        {"w.weight": weight, "w.weight_scale_inv": scale, "n.weight": torch.ones(3)},
        tmp_path / "model.safetensors",
    )
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "fp8", "weight_block_size": [4, 4]}})
    )
    reader = HFCheckpointReader(tmp_path)
    out = reader.get("w.weight")
    assert out.dtype == torch.float32
    assert torch.equal(out[:4, :4], weight[:4, :4].float() * 2.0)
    assert torch.equal(out[4:, 4:], weight[4:, 4:].float() * 0.25)
    assert torch.equal(reader.get("n.weight"), torch.ones(3))
    save_file({"w.weight": weight}, tmp_path / "model.safetensors")
    with pytest.raises(HFCheckpointError, match="no 'w.weight_scale_inv'"):
        HFCheckpointReader(tmp_path).get("w.weight")


def test_student_config_for_deepseek_v3():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from mopd_megatron.student.model import transformer_config

    cfg = {**DEEPSEEK_V3, "num_hidden_layers": 5}
    config = transformer_config(spec_from_dict(cfg), ModelConfig(), ParallelConfig())
    assert isinstance(config, MLATransformerConfig) and config.multi_latent_attention
    assert (config.q_lora_rank, config.kv_lora_rank, config.kv_channels) == (1536, 512, 128)
    assert (config.qk_head_dim, config.qk_pos_emb_head_dim, config.v_head_dim) == (128, 64, 128)
    assert (config.rope_type, config.rotary_scaling_factor) == ("yarn", 40)
    assert (config.mscale, config.mscale_all_dim) == (1.0, 1.0)
    assert config.moe_layer_freq == [0, 0, 0, 1, 1]
    assert config.moe_shared_expert_intermediate_size == 2048
    assert (config.moe_router_score_function, config.moe_router_enable_expert_bias) == (
        "sigmoid",
        True,
    )
    assert (config.moe_router_num_groups, config.moe_router_group_topk) == (8, 4)
    assert (config.moe_router_topk_scaling_factor, config.moe_router_bias_update_rate) == (2.5, 0)
    ungrouped = transformer_config(
        spec_from_dict({**cfg, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 0}),
        ModelConfig(),
        ParallelConfig(),
    )
    assert ungrouped.moe_router_num_groups is None and ungrouped.moe_layer_freq == 1
