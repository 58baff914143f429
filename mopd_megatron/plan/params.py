"""Planner stage: parameter counts of the Megatron student, per rank and for the whole model.

Consumes an `HFModelSpec` (Qwen3 dense or Qwen3-MoE) and a layout; produces counts that equal
the `numel` of the modules `student.model.build_model` creates on that rank with the local
layer spec (tests/test_plan.py, tests/test_reshard.py). The Transformer Engine spec holds the
same tensors with the norms fused into the following linear layers (not checked here: TE does
not install on CPU). Per transformer layer, with h = hidden, np / ng = query heads /
query groups, d = head_dim, I = dense MLP width, E = experts, F = expert MLP width:

    attention   h (input norm) + (np + 2 ng) d h / tp (fused QKV) + 2 d (q/k norms)
                + np d h / tp (output projection)
    dense MLP   h (pre-MLP norm) + 3 I h / tp            (SwiGLU: [gate; up] and down)
    MoE MLP     h (pre-MLP norm) + E h (router, replicated)
                + (E / ep) * 3 F h / etp                 (this rank's experts)

plus the vocabulary-parallel embedding V_pad h / tp on the first pipeline stage, and the final
norm h and output layer V_pad h / tp on the last one (the output layer is a copy of the
embedding when the embeddings are tied and pp > 1, and absent when tied and pp = 1). The
stages hold num_layers / pp consecutive layers, split further into vpp chunks with
interleaving (the chunks of a rank hold num_layers / pp layers in all); every tensor- and
expert-parallel rank of a stage holds the same count.
"""

from __future__ import annotations

from dataclasses import dataclass

from mopd_megatron.config import ParallelConfig
from mopd_megatron.hf.spec import HFModelSpec

COUNTED_MODEL_TYPES = ("qwen3", "qwen3_moe")
"""Architectures whose parameters this module can count."""


class PlanError(ValueError):
    """A model or layout the planner cannot describe (names the file or key)."""


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one rank."""

    dense: int
    """Parameters reduced over the data-parallel group: embedding, attention, norms, router,
    dense MLPs, output layer."""
    expert: int
    """Routed-expert parameters, reduced over the expert data-parallel group."""

    @property
    def total(self) -> int:
        return self.dense + self.expert


@dataclass(frozen=True)
class ModelParams:
    """Unsharded counts, comparable with published figures (HF vocabulary, no padding)."""

    total: int
    embedding: int
    """Input embedding plus output layer (once when tied)."""
    active: int
    """Parameters one token uses: all but the E - k experts it is not routed to, per layer
    (the convention of "30.5B in total and 3.3B activated")."""

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def check_countable(spec: HFModelSpec, source: str = "<model>") -> None:
    """Raise `PlanError` for an architecture this module cannot count."""
    if spec.model_type not in COUNTED_MODEL_TYPES:
        raise PlanError(
            f"{source}: the planner counts {list(COUNTED_MODEL_TYPES)} models, "
            f"got model_type {spec.model_type!r}"
        )


def layer_params(spec: HFModelSpec, tp: int = 1, ep: int = 1, etp: int = 1) -> RankParams:
    """One transformer layer's parameters on one rank (see the module docstring)."""
    h, d = spec.hidden_size, spec.head_dim
    heads, groups = spec.num_attention_heads, spec.num_key_value_heads
    attention = h + (heads + 2 * groups) * d * h // tp + 2 * d + heads * d * h // tp
    if not spec.is_moe:
        return RankParams(dense=attention + h + 3 * spec.intermediate_size * h // tp, expert=0)
    router = spec.num_experts * h
    experts = spec.num_experts // ep * 3 * spec.moe_intermediate_size * h // etp
    return RankParams(dense=attention + h + router, expert=experts)


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers held by each pipeline stage: num_layers / pp each. A split Megatron refuses
    (`student.layout.validate_layout` reports it) gives the remainder to the first stages, so that a
    plan can still be printed."""
    return [num_layers // pp + int(stage < num_layers % pp) for stage in range(pp)]


def rank_params(
    spec: HFModelSpec, parallel: ParallelConfig, padded_vocab: int, pp_rank: int
) -> RankParams:
    """Parameters of a rank of pipeline stage `pp_rank` at `parallel`'s layout.

    Args:
        spec: the student's architecture.
        parallel: the layout (tp, pp, vpp, ep, etp).
        padded_vocab: Megatron's padded vocabulary (`hf.layout.padded_vocab_size`).
        pp_rank: the pipeline stage, 0 .. pp - 1.

    Returns:
        The rank's dense and expert parameter counts.
    """
    p = parallel
    layers = stage_layers(spec.num_layers, p.pp)[pp_rank]
    per_layer = layer_params(spec, p.tp, p.ep, p.etp)
    dense, expert = layers * per_layer.dense, layers * per_layer.expert
    vocab_shard = padded_vocab // p.tp * spec.hidden_size
    if pp_rank == 0:
        dense += vocab_shard
    if pp_rank == p.pp - 1:
        dense += spec.hidden_size
        if not spec.tie_word_embeddings or p.pp > 1:
            dense += vocab_shard
    return RankParams(dense=dense, expert=expert)


def model_params(spec: HFModelSpec) -> ModelParams:
    """Total, embedding and active parameter counts of the unsharded model (HF vocabulary)."""
    layer = layer_params(spec)
    embedding = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
    total = spec.num_layers * layer.total + spec.hidden_size + embedding
    inactive = 0
    if spec.is_moe:
        per_expert = 3 * spec.moe_intermediate_size * spec.hidden_size
        inactive = spec.num_layers * (spec.num_experts - spec.num_experts_per_tok) * per_expert
    return ModelParams(total=total, embedding=embedding, active=total - inactive)
