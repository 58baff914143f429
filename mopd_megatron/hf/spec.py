"""HF conversion stage: an HF `config.json` (Qwen3, Qwen3-MoE, DeepSeek-V3) -> `HFModelSpec`.

Accepts the transformers-4 and transformers-5 spellings of the same fields
(`num_experts` / `num_local_experts`, `rope_theta` / `rope_parameters.rope_theta`,
`rope_scaling` / `rope_parameters`). Anything this project cannot convert exactly (other
architectures, attention bias, RoPE scaling other than DeepSeek's YaRN, sliding windows, dense
layers inside a Qwen3-MoE model, DeepSeek options Megatron-Core routes differently) is an
`HFConfigError` naming the file and the key, rather than a silently different student. The
DeepSeek-V3 fields are read by `hf.spec_deepseek`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


class HFConfigError(ValueError):
    """An HF checkpoint folder or config.json that cannot be converted (names file and key)."""


@dataclass(frozen=True)
class YarnRope:
    """YaRN RoPE scaling (HF `rope_type: yarn`), as DeepSeek-V3 uses it."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    """0 = HF's key absent: the softmax scale is not changed."""


@dataclass(frozen=True)
class HFModelSpec:
    """The architecture numbers of a Qwen3 / Qwen3-MoE / DeepSeek-V3 checkpoint, in HF terms."""

    model_type: str
    """'qwen3' (dense), 'qwen3_moe' or 'deepseek_v3'."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    """Dense MLP width (unused by an all-MoE model)."""
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str = "float32"
    num_experts: int = 0
    """0 for a dense model."""
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    """Renormalise the top-k router probabilities (Megatron: moe_router_pre_softmax=False)."""
    # DeepSeek-V3 family; the defaults describe Qwen3.
    q_lora_rank: int = 0
    """MLA query compression rank; 0 = HF `q_lora_rank: null` (one `q_proj`)."""
    kv_lora_rank: int = 0
    """MLA key/value compression rank; > 0 means Multi-Latent Attention."""
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True
    """HF rotates interleaved pairs (Megatron's MLA layout); False: halves, permuted on import."""
    yarn: YarnRope | None = None
    first_k_dense_replace: int = 0
    """The first k layers of an MoE model have a dense MLP of width `intermediate_size`."""
    n_shared_experts: int = 0
    """Shared experts, one MLP of width `n_shared_experts * moe_intermediate_size`."""
    score_function: str = "softmax"
    """Router score: 'softmax' (Qwen3-MoE) or 'sigmoid' (DeepSeek-V3)."""
    expert_bias: bool = False
    """Routing adds `e_score_correction_bias` to the scores when choosing experts."""
    n_group: int = 1
    topk_group: int = 1
    """Group-limited routing: experts in `n_group` groups, the best `topk_group` kept."""
    routed_scaling_factor: float = 1.0
    num_mtp_layers: int = 0
    """Multi-token-prediction modules in the HF checkpoint: neither built nor converted."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layer_pattern(self) -> list[int]:
        """Per layer: 1 = MoE, 0 = dense MLP (Megatron's `moe_layer_freq` list)."""
        dense = self.first_k_dense_replace if self.is_moe else self.num_layers
        return [0] * dense + [1] * (self.num_layers - dense)

    def to_dict(self) -> dict:
        return asdict(self)


def read_hf_config(hf_dir: str | Path) -> HFModelSpec:
    """Read `hf_dir/config.json` into an `HFModelSpec`.

    Args:
        hf_dir: an HF checkpoint folder.

    Returns:
        The spec.

    Raises:
        HFConfigError: missing folder or file, unsupported architecture or option, missing key.
    """
    hf_dir = Path(hf_dir)
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise HFConfigError(f"{hf_dir}: HF checkpoint folder not found")
    if not path.is_file():
        raise HFConfigError(f"{path}: config.json not found in the HF checkpoint folder")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HFConfigError(f"{path}: not valid JSON: {err}") from None
    return spec_from_dict(cfg, source=str(path))


def spec_from_dict(cfg: dict, source: str = "<config>") -> HFModelSpec:
    """Build an `HFModelSpec` from a parsed config.json (see `read_hf_config`)."""

    def get(*keys, default=None, required=True):
        for key in keys:
            node = cfg
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                return node
        if required and default is None:
            raise HFConfigError(f"{source}: missing key {' or '.join(repr(k) for k in keys)}")
        return default

    archs = get("architectures")
    model_type = ARCHITECTURES.get(archs[0]) if isinstance(archs, list) and archs else None
    if model_type is None:
        raise HFConfigError(
            f"{source}: unsupported architecture {archs!r} in 'architectures'; "
            f"supported: {sorted(ARCHITECTURES)}"
        )
    reject(source, "attention_bias", get("attention_bias", default=False), False)
    reject(source, "use_sliding_window", get("use_sliding_window", default=False), False)
    reject(source, "hidden_act", get("hidden_act", default="silu"), "silu")
    _check_quantization(get("quantization_config", required=False), source)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    moe = {}
    if model_type == "deepseek_v3":
        from mopd_megatron.hf.spec_deepseek import deepseek_fields

        moe = deepseek_fields(get, source)
    else:
        reject(source, "rope_parameters.rope_type", rope_type(get), "default")
    if model_type == "qwen3_moe":
        reject(source, "mlp_only_layers", list(get("mlp_only_layers", default=[])), [])
        reject(source, "decoder_sparse_step", get("decoder_sparse_step", default=1), 1)
        moe = {
            "num_experts": int(get("num_experts", "num_local_experts")),
            "num_experts_per_tok": int(get("num_experts_per_tok")),
            "moe_intermediate_size": int(get("moe_intermediate_size")),
            "norm_topk_prob": bool(get("norm_topk_prob", default=False)),
        }
    return HFModelSpec(
        model_type=model_type,
        vocab_size=int(get("vocab_size")),
        hidden_size=int(hidden),
        num_layers=int(get("num_hidden_layers")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(get("num_key_value_heads", default=heads)),
        head_dim=int(get("head_dim", default=hidden // heads)),
        intermediate_size=int(get("intermediate_size")),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=float(get("rope_parameters.rope_theta", "rope_theta")),
        max_position_embeddings=int(get("max_position_embeddings")),
        tie_word_embeddings=bool(get("tie_word_embeddings", default=False)),
        dtype=str(get("dtype", "torch_dtype", default="float32")),
        **moe,
    )


def _check_quantization(quant: dict | None, source: str) -> None:
    """Only block-wise FP8 weights (dequantized by `HFCheckpointReader`) are readable."""
    if quant is None:
        return
    method, block = quant.get("quant_method"), quant.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2):
        raise HFConfigError(
            f"{source}: 'quantization_config' = {quant!r} is not supported (only block-wise "
            "FP8: quant_method 'fp8' with a 2-element weight_block_size, dequantized on read)"
        )


def rope_type(get) -> str:
    """HF's RoPE type under any of its spellings ('default' when absent)."""
    return get(
        "rope_parameters.rope_type",
        "rope_scaling.rope_type",
        "rope_scaling.type",
        default="default",
    )


def reject(source: str, key: str, value, supported) -> None:
    if value != supported:
        raise HFConfigError(f"{source}: '{key}' = {value!r} is not supported (only {supported!r})")
