"""Tiny random Qwen3 / Qwen3-MoE checkpoints built with `transformers` (no hub download).

Used by the conversion, student, serving and loop tests. fp32 weights so that logits can
be compared across implementations at 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from mopd_megatron.demo.tokenizer import build_char_tokenizer

# head_dim (16) != hidden/heads (64/4 = 16 would hide bugs), so use hidden 48.
COMMON = dict(
    vocab_size=42,
    hidden_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def make_tiny_hf_model(
    path: str | Path, arch: str = "qwen3_moe", tie_word_embeddings: bool = False, seed: int = 0
) -> Path:
    """Write a tiny random HF checkpoint (+ the toy tokenizer) to `path` and return it."""
    torch.manual_seed(seed)
    if arch == "qwen3_moe":
        config = Qwen3MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            router_aux_loss_coef=0.0,
            tie_word_embeddings=tie_word_embeddings,
        )
        model = Qwen3MoeForCausalLM(config)
    elif arch == "qwen3":
        config = Qwen3Config(
            **COMMON, intermediate_size=64, tie_word_embeddings=tie_word_embeddings
        )
        model = Qwen3ForCausalLM(config)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}")
    # Random init draws small weights; scale them up so logits differ clearly between tokens.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    path = Path(path)
    model.to(torch.float32).save_pretrained(path)
    build_char_tokenizer(str(path))
    return path
