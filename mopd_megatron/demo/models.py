"""Toy world, models: the tiny Qwen3-MoE student and its HF folders.

The shape (745K parameters, 450K active) fits every layout the demo uses: 4 heads and 2
KV groups split over TP=2, 4 experts over EP=2, and the 42-token vocabulary is padded by
Megatron to 128·TP. Embeddings are tied; the router's auxiliary loss is off.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

STUDENT_SHAPE = {
    "hidden_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "moe_intermediate_size": 128,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.0,
    "tie_word_embeddings": True,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
}


def new_student(tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3MoeForCausalLM:
    """A freshly initialised fp32 student for `tokenizer`'s vocabulary."""
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **STUDENT_SHAPE,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config).to(torch.float32)


def save_hf(model: Qwen3MoeForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """Write an HF folder (safetensors, config.json, tokenizer, generation config).

    config.json also carries the transformers-4 names (`num_experts`, `rope_theta`) so that
    older readers (SGLang pinned to transformers 4) load it too.
    """
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.setdefault("num_experts", config.get("num_local_experts"))
    config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
