"""HF conversion stage: an HF `config.json` (Qwen3 dense or Qwen3-MoE) -> `HFModelSpec`.

Accepts the transformers-4 and transformers-5 spellings of the same fields
(`num_experts` / `num_local_experts`, `rope_theta` / `rope_parameters.rope_theta`). Anything
this project cannot convert exactly (other architectures, attention bias, RoPE scaling,
sliding windows, dense layers inside an MoE model) is an `HFConfigError` naming the file and
the key, rather than a silently different student.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe"}


class HFConfigError(ValueError):
    """An HF checkpoint folder or config.json that cannot be converted (names file and key)."""


@dataclass(frozen=True)
class HFModelSpec:
    """The architecture numbers of a Qwen3 / Qwen3-MoE checkpoint, in HF terms."""

    model_type: str
    """'qwen3' (dense) or 'qwen3_moe'."""
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

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

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
    _reject(source, "attention_bias", get("attention_bias", default=False), False)
    _reject(source, "use_sliding_window", get("use_sliding_window", default=False), False)
    _reject(source, "hidden_act", get("hidden_act", default="silu"), "silu")
    rope_type = get(
        "rope_parameters.rope_type",
        "rope_scaling.rope_type",
        "rope_scaling.type",
        default="default",
    )
    _reject(source, "rope_parameters.rope_type", rope_type, "default")
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    moe = {}
    if model_type == "qwen3_moe":
        _reject(source, "mlp_only_layers", list(get("mlp_only_layers", default=[])), [])
        _reject(source, "decoder_sparse_step", get("decoder_sparse_step", default=1), 1)
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


def _reject(source: str, key: str, value, supported) -> None:
    if value != supported:
        raise HFConfigError(f"{source}: '{key}' = {value!r} is not supported (only {supported!r})")
