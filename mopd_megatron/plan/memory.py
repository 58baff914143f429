"""Planner stage: memory of one student rank per pipeline stage, before anything is launched.

Consumes the recipe (layout, precision, optimizer, recompute, micro-batch, lengths, loss), the
student's `HFModelSpec` and its world size; produces one `StageMemory` per pipeline stage, in
bytes. The estimate, for the peak of one training step on a rank of that stage:

- weights: params * (2 for bf16, 4 for fp32).
- gradients: params * 4 (Megatron's DDP accumulates in fp32 buffers, `grad_reduce_in_fp32`).
- optimizer: Adam moments (8 B/param) plus, for bf16, fp32 main weights (4 B/param): 12 or 8,
  divided by the data-parallel size (dense) or the expert data-parallel size (experts) with
  the distributed optimizer. Megatron's own table (docs: "Distributed Optimizer") gives the
  same totals: bf16 params with fp32 grads 18 B/param, or 6 + 12/d distributed.
- activations, kept for backward, per token of a micro-batch (T = mbs * seq / cp tokens) and
  per layer, in elements of the model dtype; "/sp" divides by tp under sequence
  parallelism. Flash attention is assumed (no s^2 scores):
      attention  2h/sp (norm and QKV inputs) + (3 np + 3 ng) d / tp (QKV out, q/k after norm
                 and RoPE, attention output)
      dense MLP  2h/sp + 3 I / tp (norm and fc1 inputs, [gate; up], SwiGLU output)
      MoE MLP    per token of this rank (T / sp): 2h + k (2 h etp + 3 F) (norm and router
                 inputs; each of the k routed copies: expert input and output, [gate; up],
                 SwiGLU output), plus 2E fp32 router logits and probabilities
  With full recompute a layer keeps only its input (h/sp) and one layer is rebuilt at a time.
  A stage keeps the activations of its in-flight micro-batches: 1 without pipelining,
  min(M, pp - r) on stage r with 1F1B, and with interleaving the warm-up count of Megatron's
  schedule, 2 (pp - r - 1) + (vpp - 1) pp + 1 chunks of num_layers / (pp vpp) layers.
- KL kernel buffers (last stage, one micro-batch): the logits shard [N, V_pad / tp] in fp32
  (Float16Module returns fp32 logits), one gradient buffer per kernel call in the logits'
  dtype (log-prob/entropy; the top-k or full-vocabulary KL adds a second), the gradient cast
  back to bf16, the teacher's logits shard for the full-vocabulary losses, the teacher's
  top-k ids and log-probs, and O(N) fp32 row statistics (16 floats per token). The teachers'
  own memory in the trainer (LM-head shards or local models) is `payload.py`'s.

Not modelled: the CUDA context, NCCL and allocator slack (`launch.memory_utilization`
reserves them), and temporaries inside a single kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from mopd_megatron.config import Recipe, teacher_payload
from mopd_megatron.hf.spec import HFModelSpec
from mopd_megatron.mopd.objectives import LossContext, build_objective
from mopd_megatron.plan.params import RankParams, rank_params, stage_layers

ROW_STATS_FLOATS = 16
"""fp32 values per token the KL kernels keep (row statistics and gradient coefficients)."""


@dataclass(frozen=True)
class StepShape:
    """How one training step is cut up on each data-parallel rank."""

    world_size: int
    dp: int
    """Data-parallel size, world / (tp * pp * cp)."""
    expert_dp: int
    """Expert data-parallel size, world / (pp * ep * etp)."""
    sequences: int
    """Sequences per step: prompts_per_step * n_samples_per_prompt."""
    seq_len: int
    """Longest sequence: data.max_prompt_tokens + rollout.max_new_tokens."""
    micro_batches: int
    """Micro-batches per step on each DP rank (M)."""


@dataclass(frozen=True)
class StageMemory:
    """Peak memory of one rank of a pipeline stage, in bytes."""

    stage: int
    params: RankParams
    weights: int
    gradients: int
    optimizer: int
    activations: int
    kl_buffers: int
    in_flight: float
    """Micro-batches whose activations are held at once (layer-weighted with interleaving)."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.kl_buffers


def step_shape(recipe: Recipe, world_size: int) -> StepShape:
    """The step's data-parallel sizes and micro-batch count (integer division; see checks)."""
    p = recipe.parallel
    dp = max(1, world_size // (p.tp * p.pp * p.cp))
    expert_dp = max(1, world_size // (p.pp * p.ep * p.etp))
    sequences = recipe.data.prompts_per_step * recipe.rollout.n_samples_per_prompt
    per_rank = max(1, sequences // dp)
    micro_batches = -(-per_rank // p.micro_batch_size)
    seq_len = recipe.data.max_prompt_tokens + recipe.rollout.max_new_tokens
    return StepShape(world_size, dp, expert_dp, sequences, seq_len, micro_batches)


def layer_activation_elements(spec: HFModelSpec, recipe: Recipe) -> tuple[float, float]:
    """(kept for backward without recompute, kept with full recompute) per token of a
    micro-batch and per layer, in model-dtype elements (see the module docstring)."""
    p = recipe.parallel
    h, d, tp = spec.hidden_size, spec.head_dim, p.tp
    sp = tp if p.use_sequence_parallel else 1
    attention = 2 * h / sp + (3 * spec.num_attention_heads + 3 * spec.num_key_value_heads) * d / tp
    if spec.is_moe:
        k, f = spec.num_experts_per_tok, spec.moe_intermediate_size
        fp32_ratio = 4 / _dtype_bytes(recipe)
        mlp = (2 * h + k * (2 * h * p.etp + 3 * f) + 2 * spec.num_experts * fp32_ratio) / sp
    else:
        mlp = 2 * h / sp + 3 * spec.intermediate_size / tp
    return attention + mlp, h / sp


def in_flight(recipe: Recipe, micro_batches: int, stage: int) -> float:
    """Micro-batches whose activations stage `stage` holds at its peak, in units of the whole
    stage's layers (a chunk of an interleaved schedule counts 1 / vpp)."""
    p = recipe.parallel
    if p.pp == 1:
        return 1.0
    if not p.vpp:
        return float(min(micro_batches, p.pp - stage))
    chunks = 2 * (p.pp - stage - 1) + (p.vpp - 1) * p.pp + 1
    return min(micro_batches * p.vpp, chunks) / p.vpp


def kl_buffer_bytes(spec: HFModelSpec, recipe: Recipe, padded_vocab: int, seq_len: int) -> int:
    """The loss's buffers on the last stage for one micro-batch (see the module docstring)."""
    p = recipe.parallel
    ctx = LossContext(vocab_size=spec.vocab_size, teacher_payload=teacher_payload(recipe))
    objective = build_objective(recipe.algorithm, ctx)
    needs = objective.needs
    tokens = p.micro_batch_size * seq_len // p.cp
    shard = tokens * (padded_vocab // p.tp)
    logits = 4  # Float16Module returns fp32 logits
    cast_back = _dtype_bytes(recipe) if recipe.model.dtype == "bfloat16" else 0
    per_element = logits * (1 + objective.kernel_passes) + cast_back
    if needs.local_teacher_logits or needs.teacher_hidden_states:
        per_element += 4  # the teacher's fp32 logits shard (local model, or hidden @ head)
    per_token = ROW_STATS_FLOATS * 4
    per_token += needs.topk_width * (8 + 4)  # int64 ids and fp32 log-probs
    return shard * per_element + tokens * per_token


def student_memory(
    spec: HFModelSpec, recipe: Recipe, world_size: int, padded_vocab: int
) -> tuple[StepShape, list[StageMemory]]:
    """Peak memory of a rank of every pipeline stage.

    Args:
        spec: the student's architecture.
        recipe: the recipe (layout, dtype, optimizer, recompute, batch and lengths, loss).
        world_size: the student's ranks.
        padded_vocab: Megatron's padded vocabulary at this TP.

    Returns:
        (the step's shape, one `StageMemory` per pipeline stage).
    """
    p = recipe.parallel
    shape = step_shape(recipe, world_size)
    param_bytes = _dtype_bytes(recipe)
    adam = 12 if recipe.model.dtype == "bfloat16" else 8
    distributed = recipe.optimizer.use_distributed_optimizer
    full, recomputed = layer_activation_elements(spec, recipe)
    tokens = p.micro_batch_size * shape.seq_len / p.cp
    sp = p.tp if p.use_sequence_parallel else 1
    layers = stage_layers(spec.num_layers, p.pp)
    stages = []
    for stage in range(p.pp):
        params = rank_params(spec, p, padded_vocab, stage)
        held = in_flight(recipe, shape.micro_batches, stage)
        if recipe.model.recompute_activations:
            elements = layers[stage] * recomputed * held + full
        else:
            elements = layers[stage] * full * held
        if stage == p.pp - 1:
            elements += 2 * spec.hidden_size / sp  # final norm and output-layer inputs
        dense_div = shape.dp * p.cp if distributed else 1
        expert_div = shape.expert_dp if distributed else 1
        optimizer = adam * (params.dense / dense_div + params.expert / expert_div)
        last = stage == p.pp - 1
        kl = kl_buffer_bytes(spec, recipe, padded_vocab, shape.seq_len) if last else 0
        stages.append(
            StageMemory(
                stage=stage,
                params=params,
                weights=params.total * param_bytes,
                gradients=params.total * 4,
                optimizer=int(optimizer),
                activations=int(elements * tokens * param_bytes),
                kl_buffers=kl,
                in_flight=held,
            )
        )
    return shape, stages


def _dtype_bytes(recipe: Recipe) -> int:
    return 2 if recipe.model.dtype == "bfloat16" else 4
