"""Planner stage: GPUs and memory of the SGLang servers (the rollout engine and the teachers).

Consumes the recipe's `sglang` engines with the architecture each one serves; produces one
`ServerPlan` per server. The rollout engine is one server; teachers that name the same model
folder share one server (as `teachers.TeacherPool` starts them), with the first one's settings.
Engines of kind `local` or `url` take no GPUs of the job and are not planned.

An SGLang server runs dp replicas of tp GPUs each, or with data-parallel attention
(`--attn-dp-size A`; before SGLang 0.5.23 `--enable-dp-attention` with A = dp) tp GPUs in all
whose attention runs as A groups of tp / A GPUs. Per GPU it holds about 1/tp of the
weights (in the checkpoint dtype, 1 byte with --quantization fp8) and a KV-cache pool filling
the rest of mem_fraction_static * GPU memory; a token of context costs 2 (K and V) * layers *
max(1, ng / attention tp) KV heads * head_dim * 2 bytes on each GPU of its replica (or
attention group). Not modelled: CUDA graphs and the prefill logits outside the static pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mopd_megatron.config import EngineConfig
from mopd_megatron.hf.spec import HFModelSpec
from mopd_megatron.plan.params import model_params

GIB = 1 << 30


@dataclass(frozen=True)
class ServerPlan:
    """One SGLang server of the job."""

    name: str
    """'rollout', or the teacher names it serves joined by '+'."""
    key: str
    """Recipe key of its settings, e.g. 'rollout' or 'teachers.teachers[1]'."""
    model_path: str
    gpus: int
    weights_per_gpu: int
    """Bytes of weights on each GPU."""
    kv_tokens: int
    """Tokens of context the KV-cache pools of all its replicas hold at once."""
    problems: list[str] = field(default_factory=list)


def attention_dp(cfg: EngineConfig) -> int:
    """Data-parallel attention groups of the server (0 = none)."""
    size = _flag_value(cfg.extra_args, "--attn-dp-size")
    if size is not None:
        return int(size)
    return cfg.dp if "--enable-dp-attention" in cfg.extra_args else 0


def server_gpus(cfg: EngineConfig) -> int:
    """GPUs of one SGLang server: tp * dp, or tp with data-parallel attention."""
    return cfg.tp if attention_dp(cfg) else cfg.tp * cfg.dp


def weight_bytes(spec: HFModelSpec, cfg: EngineConfig) -> int:
    """Bytes per parameter the server stores."""
    if _flag_value(cfg.extra_args, "--quantization") in ("fp8", "w8a8_fp8"):
        return 1
    return 4 if spec.dtype == "float32" else 2


def plan_server(
    name: str, key: str, cfg: EngineConfig, model_path: str, spec: HFModelSpec,
    gpu_memory_gib: float, seq_len: int,
) -> ServerPlan:
    """GPUs, weights per GPU and KV-cache capacity of one server, with what cannot work.

    Args:
        name: what the server serves ('rollout' or teacher names).
        key: recipe key of its settings (for messages).
        cfg: its engine settings (tp, dp, ep, mem_fraction_static, extra_args).
        model_path: the model folder it serves.
        spec: that model's architecture.
        gpu_memory_gib: memory of one GPU.
        seq_len: the longest sequence it must hold (prompt + response).

    Returns:
        The server's plan; `problems` lists what makes it impossible.
    """
    problems = []
    if spec.num_attention_heads % cfg.tp:
        problems.append(f"{key}.tp = {cfg.tp} does not divide {spec.num_attention_heads} heads")
    if cfg.tp % cfg.ep:
        problems.append(f"{key}.ep = {cfg.ep} must divide {key}.tp = {cfg.tp}")
    if spec.is_moe and spec.num_experts % cfg.ep:
        problems.append(f"{key}.ep = {cfg.ep} does not divide {spec.num_experts} experts")
    dp_attention = attention_dp(cfg)
    if dp_attention and cfg.tp % dp_attention:
        problems.append(f"{key}: data-parallel attention needs its size {dp_attention} to "
                        f"divide tp = {cfg.tp}")
    weights = model_params(spec).total * weight_bytes(spec, cfg) // cfg.tp
    pool = int(cfg.mem_fraction_static * gpu_memory_gib * GIB) - weights
    attention_tp = max(1, cfg.tp // dp_attention) if dp_attention else cfg.tp
    kv_heads = max(1, spec.num_key_value_heads // attention_tp)
    per_token = 2 * spec.num_layers * kv_heads * spec.head_dim * 2
    replicas = dp_attention or cfg.dp
    kv_tokens = max(0, pool) // per_token * replicas
    if pool <= 0:
        problems.append(
            f"{key}: weights need {weights / GIB:.1f} GiB per GPU, more than "
            f"mem_fraction_static {cfg.mem_fraction_static} of {gpu_memory_gib} GiB; "
            f"raise {key}.tp"
        )
    elif kv_tokens // replicas < seq_len:
        problems.append(
            f"{key}: the KV cache holds {kv_tokens // replicas} tokens per replica, less than "
            f"one {seq_len}-token sequence; raise {key}.tp or mem_fraction_static"
        )
    return ServerPlan(name, key, model_path, server_gpus(cfg), weights, kv_tokens, problems)


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag v` or `--flag=v` in a command line, or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None
