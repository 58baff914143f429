"""The student's TransformerConfig mirrors the HF architecture (no process group needed)."""

import pytest
import torch.nn.functional as F

from mopd_megatron.config import ModelConfig, ParallelConfig
from mopd_megatron.hf.spec import read_hf_config
from mopd_megatron.student.model import transformer_config


def test_moe_config_matches_hf(tiny_moe_dir):
    spec = read_hf_config(tiny_moe_dir)
    cfg = transformer_config(spec, ModelConfig(), ParallelConfig(tp=2, ep=2))
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads) == (4, 48, 4)
    assert (cfg.num_query_groups, cfg.kv_channels, cfg.layernorm_epsilon) == (2, 16, 1e-6)
    assert cfg.qk_layernorm and cfg.gated_linear_unit and cfg.activation_func is F.silu
    assert cfg.normalization == "RMSNorm" and not cfg.add_bias_linear
    assert (cfg.num_moe_experts, cfg.moe_router_topk, cfg.moe_ffn_hidden_size) == (4, 2, 32)
    # norm_topk_prob=True: softmax over the top-k logits (Megatron's pre_softmax=False).
    assert cfg.moe_router_pre_softmax is False
    assert (
        cfg.moe_token_dispatcher_type == "alltoall" and cfg.moe_router_load_balancing_type == "none"
    )
    assert cfg.sequence_parallel and cfg.calculate_per_token_loss
    assert (cfg.expert_model_parallel_size, cfg.expert_tensor_parallel_size) == (2, 1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_config_dtype_and_recompute(tiny_dense_dir, dtype):
    spec = read_hf_config(tiny_dense_dir)
    model_cfg = ModelConfig(dtype=dtype, recompute_activations=True)
    cfg = transformer_config(spec, model_cfg, ParallelConfig(pp=2))
    assert cfg.num_moe_experts is None and cfg.ffn_hidden_size == 64
    assert cfg.bf16 == (dtype == "bfloat16") and cfg.pipeline_dtype == cfg.params_dtype
    assert cfg.recompute_granularity == "full" and not cfg.sequence_parallel
