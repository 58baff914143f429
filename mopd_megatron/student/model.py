"""Student stage: build the Megatron-Core `GPTModel` student from an HF Qwen3 / Qwen3-MoE /
DeepSeek-V3 config.

`HFModelSpec` + `ModelConfig` + `ParallelConfig` -> `TransformerConfig` + layer spec ->
one `GPTModel` per virtual pipeline stage on this rank (wrapped in `Float16Module` for bf16),
then the HF weights are loaded at this rank's layout (`student.hf_weights.load_hf_weights`).

The forward of a chunk on the last stage, `chunk(input_ids [b, s], position_ids [b, s],
attention_mask=None)`, returns vocabulary-sharded logits [b, s, V_padded / tp]
(`parallel_output=True`); columns at and beyond the HF `vocab_size` are padding. Other stages
return hidden states [s, b, H] (or [s / tp, b, H] with sequence parallelism).

Qwen3 -> Megatron settings: RMSNorm with HF's eps, q/k RMSNorm per head (`qk_layernorm`), GQA
(`num_query_groups`), `kv_channels = head_dim`, RoPE with HF's base, SwiGLU with [gate; up]
fc1, no linear biases. Routing: HF takes the top-k of softmax(logits) and renormalises them when
`norm_topk_prob`; Megatron with `moe_router_pre_softmax=False` takes softmax over the top-k
logits, which is the same distribution, and with `pre_softmax=True` it takes the top-k of
softmax(logits) without renormalising. Hence `moe_router_pre_softmax = not norm_topk_prob`.
DeepSeek-V3 (MLA, dense first layers, shared experts, sigmoid routing with expert bias) adds
the settings of `student.deepseek`; its layers are built from per-layer specs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from mopd_megatron.config import ModelConfig, ParallelConfig, RecipeError
from mopd_megatron.hf.layout import padded_vocab_size
from mopd_megatron.hf.spec import HFModelSpec, read_hf_config
from mopd_megatron.student.hf_weights import load_hf_weights, unwrap  # noqa: F401 (re-export)


def use_transformer_engine() -> bool:
    """True when Transformer Engine is importable (GPU machines): use the TE layer spec."""
    return importlib.util.find_spec("transformer_engine") is not None


def transformer_config(
    spec: HFModelSpec, model_cfg: ModelConfig, parallel_cfg: ParallelConfig, **overrides
):
    """The `TransformerConfig` of the student.

    Args:
        spec: the HF architecture.
        model_cfg: dtype, MoE dispatcher and aux-loss weight, activation recompute.
        parallel_cfg: the layout (tp, pp, vpp, cp, ep, etp, sequence parallelism).
        **overrides: extra `TransformerConfig` fields (e.g. `variable_seq_lengths=True`).

    Returns:
        A `megatron.core.transformer.TransformerConfig`.
    """
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    dtype = torch.bfloat16 if model_cfg.dtype == "bfloat16" else torch.float32
    kwargs = {
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "ffn_hidden_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_query_groups": spec.num_key_value_heads,
        "kv_channels": spec.head_dim,
        "normalization": "RMSNorm",
        "layernorm_epsilon": spec.rms_norm_eps,
        "qk_layernorm": True,
        "gated_linear_unit": True,
        "activation_func": F.silu,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "tensor_model_parallel_size": parallel_cfg.tp,
        "pipeline_model_parallel_size": parallel_cfg.pp,
        "virtual_pipeline_model_parallel_size": parallel_cfg.vpp,
        "context_parallel_size": parallel_cfg.cp,
        "expert_model_parallel_size": parallel_cfg.ep,
        "expert_tensor_parallel_size": parallel_cfg.etp,
        "sequence_parallel": parallel_cfg.use_sequence_parallel,
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": dtype == torch.bfloat16,
        "use_cpu_initialization": not torch.cuda.is_available(),
        "calculate_per_token_loss": True,
    }
    if model_cfg.recompute_activations:
        kwargs.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    if spec.is_moe:
        kwargs.update(
            num_moe_experts=spec.num_experts,
            moe_router_topk=spec.num_experts_per_tok,
            moe_ffn_hidden_size=spec.moe_intermediate_size,
            moe_router_pre_softmax=not spec.norm_topk_prob,
            moe_token_dispatcher_type=model_cfg.moe_token_dispatcher,
            moe_aux_loss_coeff=model_cfg.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss" if model_cfg.moe_aux_loss_coeff else "none",
            moe_grouped_gemm=use_transformer_engine(),
        )
    if spec.is_mla:
        from mopd_megatron.student.deepseek import deepseek_config_kwargs

        if parallel_cfg.tp > 1 and not parallel_cfg.use_sequence_parallel:
            raise RecipeError("MLA with tp > 1 needs parallel.sequence_parallel: true")
        kwargs.update(deepseek_config_kwargs(spec))
    kwargs.update(overrides)
    return (MLATransformerConfig if spec.is_mla else TransformerConfig)(**kwargs)


def layer_spec(spec: HFModelSpec, config, vp_stage: int | None = None):
    """The layer spec: Transformer Engine when importable, else the local one.

    One `ModuleSpec` for all layers (Qwen3), or, for MLA models (whose dense first layers make
    the block non-homogeneous), the block spec of this pipeline stage's layers.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if spec.is_mla:
        from mopd_megatron.student.deepseek import mla_block_spec

        return mla_block_spec(config, use_transformer_engine(), vp_stage)
    num_experts = spec.num_experts or None
    if use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=True
        )
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=num_experts, moe_grouped_gemm=False, qk_layernorm=True, normalization="RMSNorm"
    )


def gpt_model(spec: HFModelSpec, config, layers, padded_vocab: int, *, vp_stage: int | None,
              pre_process: bool, post_process: bool, **kwargs) -> torch.nn.Module:
    """Megatron's `GPTModel` for an HF architecture: the one place its arguments are chosen
    (vocabulary-parallel logits, RoPE, tied embeddings), for training and for the planner."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layers,
        vocab_size=padded_vocab,
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
        vp_stage=vp_stage,
        **kwargs,
    )


def build_model(
    spec: HFModelSpec,
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    padded_vocab: int | None = None,
    **config_overrides,
) -> list[torch.nn.Module]:
    """Build this rank's model chunks (randomly initialised) after `init_parallel`.

    Args:
        spec: the HF architecture.
        model_cfg: see `transformer_config`; `make_vocab_size_divisible_by` sets the padding.
        parallel_cfg: the layout `init_parallel` set up.
        padded_vocab: the padded vocabulary size (default: Megatron's rule,
            `make_vocab_size_divisible_by * tp`); pass a checkpoint's size to load it at
            another TP.
        **config_overrides: extra `TransformerConfig` fields.

    Returns:
        One module per virtual pipeline stage (a `GPTModel`, in `Float16Module` for bf16).
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.module import Float16Module

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != parallel_cfg.tp:
        raise RecipeError(f"parallel.tp = {parallel_cfg.tp} but the process groups have tp = {tp}")
    if padded_vocab is None:
        padded_vocab = padded_vocab_size(
            spec.vocab_size, model_cfg.make_vocab_size_divisible_by, tp
        )
    if padded_vocab % tp or padded_vocab < spec.vocab_size:
        raise RecipeError(
            f"padded vocabulary {padded_vocab} must be >= {spec.vocab_size} and "
            f"divisible by tp = {tp}"
        )
    config = transformer_config(spec, model_cfg, parallel_cfg, **config_overrides)
    chunks = []
    for vp_stage in range(parallel_cfg.vpp or 1):
        vp = vp_stage if parallel_cfg.vpp else None
        model = gpt_model(
            spec, config, layer_spec(spec, config, vp), padded_vocab, vp_stage=vp,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
        )
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(Float16Module(config, model) if config.bf16 else model)
    return chunks


def build_student(
    hf_dir: str | Path, model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
    spec: HFModelSpec | None = None, **config_overrides
) -> tuple[list[torch.nn.Module], HFModelSpec]:
    """Build the student at this rank's layout and load the HF checkpoint into it.

    Call `student.parallel.init_parallel(parallel_cfg, seed, spec)` first.

    Args:
        hf_dir: HF checkpoint folder (config.json + safetensors).
        model_cfg: the model recipe stage.
        parallel_cfg: the layout.
        spec: the folder's architecture, when the caller has read it already.
        **config_overrides: extra `TransformerConfig` fields.

    Returns:
        (model chunks, one per virtual stage; the HF spec).
    """
    spec = spec or read_hf_config(hf_dir)
    chunks = build_model(spec, model_cfg, parallel_cfg, **config_overrides)
    load_hf_weights(chunks, hf_dir, spec)
    return chunks, spec


def sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    """The model part of a `dist_checkpointing` state dict, keyed as Megatron's training does
    (`model`, or `model0`, `model1`, ... with virtual stages)."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
