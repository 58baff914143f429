"""Student stage, layout rules: which TP/PP/EP/CP layouts Megatron can build for a model.

Pure Python (no Megatron import), so the planner, the converter and `init_parallel` all check
a layout the same way before anything is built.
"""

from __future__ import annotations

from mopd_megatron.config import ParallelConfig, RecipeError
from mopd_megatron.hf.spec import HFModelSpec


def validate_layout(
    parallel: ParallelConfig,
    world_size: int,
    *,
    num_layers: int,
    num_attention_heads: int,
    num_query_groups: int,
    num_experts: int = 0,
    source: str = "<recipe>",
) -> None:
    """Fail early, with the rule that is broken, on a layout Megatron cannot build."""
    p = parallel
    model_parallel = p.tp * p.pp * p.cp
    problems = []
    if world_size % model_parallel:
        problems.append(f"world size {world_size} is not divisible by tp*pp*cp = {model_parallel}")
    else:
        dp = world_size // model_parallel
        if num_experts and (dp * p.tp * p.cp) % (p.ep * p.etp):
            problems.append(
                f"ep*etp = {p.ep * p.etp} does not divide dp*tp*cp = {dp * p.tp * p.cp}"
            )
    if num_attention_heads % p.tp:
        problems.append(f"{num_attention_heads} attention heads are not divisible by tp = {p.tp}")
    if num_query_groups % p.tp and p.tp % num_query_groups:
        problems.append(
            f"{num_query_groups} query groups and tp = {p.tp}: neither divides the other"
        )
    if num_layers % p.pp:
        problems.append(f"{num_layers} layers are not divisible by pp = {p.pp}")
    if p.vpp and num_layers % (p.pp * p.vpp):
        problems.append(f"{num_layers} layers are not divisible by pp*vpp = {p.pp * p.vpp}")
    if num_experts:
        if num_experts % p.ep:
            problems.append(f"{num_experts} experts are not divisible by ep = {p.ep}")
        if p.tp > 1 and not p.use_sequence_parallel:
            problems.append("MoE with tp > 1 needs parallel.sequence_parallel: true")
    elif p.ep > 1:
        problems.append(f"ep = {p.ep} but the model has no experts")
    if problems:
        raise RecipeError(f"{source}: impossible parallel layout: " + "; ".join(problems))


def layout_dims(parallel: ParallelConfig, spec: HFModelSpec | None) -> dict:
    """The model dimensions `validate_layout` checks (neutral ones without a model)."""
    if spec is not None:
        return {
            "num_layers": spec.num_layers,
            "num_attention_heads": spec.num_attention_heads,
            "num_query_groups": spec.num_key_value_heads,
            "num_experts": spec.num_experts,
        }
    return {
        "num_layers": parallel.pp * (parallel.vpp or 1),
        "num_attention_heads": parallel.tp,
        "num_query_groups": parallel.tp,
        "num_experts": parallel.ep if parallel.ep > 1 else 0,
    }
