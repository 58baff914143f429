"""Planner stage: what the teachers' payload costs, against the other payloads and local teachers.

Per scored token, in the form the batch holds it on every rank (`summary.teacher_payload_bytes`
logs the same figure from a run):

    sampled        4 B             the sampled token's fp32 log-prob
    topk           12 k B          k int64 ids + k fp32 log-probs (k at most the vocabulary)
    student_topk   12 k B          the same, at the student's top-k ids instead of the teacher's
    hidden_states  H_T * d B       the teacher's final hidden state (d = 2 for bf16)

Network per step: scored tokens (sequences * rollout.max_new_tokens at most) times that, once
from the teacher servers to rank 0, then from rank 0 to each other rank (the trajectories are
broadcast). With `student_topk` the leg to rank 0 is larger: the teacher answers, at every
position, for the union of the sequence's student top-k ids (one `token_ids_logprob` list per
sequence, up to min(k * T, V) ids for T response tokens), and rank 0 keeps k of them; the
rollout engine also returns its top-k per sampled token. Trainer memory on a last-stage rank: with `hidden_states`, each distinct teacher's
fp32 LM-head shard [V_pad / tp, H_T] plus one micro-batch's hidden states; a local teacher
instead holds its whole model at the student's layout (about params / (tp * pp * ep) in the
model dtype, the same split as the student's weights). Both full-vocabulary routes hold the
teacher's fp32 logits shard per micro-batch, counted in `memory.kl_buffer_bytes`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mopd_megatron.config import Recipe, TeacherConfig, teacher_payload
from mopd_megatron.hf.spec import HFModelSpec
from mopd_megatron.mopd.objectives import LossContext, build_objective
from mopd_megatron.plan.memory import StepShape
from mopd_megatron.plan.params import PlanError, model_params


@dataclass(frozen=True)
class PayloadPlan:
    """The chosen payload's costs and the per-token size of each alternative."""

    payload: str
    """'sampled', 'topk', 'student_topk', 'hidden_states', 'local' or '' (no teacher)."""
    per_token: dict[str, int]
    """Bytes per scored token of each served payload."""
    step_bytes: int
    """Bytes of the chosen payload per step, teacher servers -> rank 0 (and again to each rank)."""
    trainer_bytes: int
    """Memory the teachers take on a last-stage student rank (head shards or local models)."""


def payload_plan(recipe: Recipe, spec: HFModelSpec,
                 load: Callable[[int, TeacherConfig], HFModelSpec], padded_vocab: int,
                 shape: StepShape) -> PayloadPlan:
    """The costs of the recipe's teacher payload.

    Args:
        recipe: The recipe (loss, teachers, layout, lengths).
        spec: The student's architecture.
        load: (index, teacher) -> the teacher's architecture (raises `PlanError` when it
            cannot be found: an error only if the payload puts the teacher in the trainer).
        padded_vocab: The student's padded vocabulary.
        shape: The step's shape (sequences, micro-batch tokens).
    """
    ctx = LossContext(vocab_size=spec.vocab_size, teacher_payload=teacher_payload(recipe))
    objective = build_objective(recipe.algorithm, ctx)
    payload = ctx.teacher_payload or (objective.payloads or ("",))[0]
    try:
        teachers = {t.model_path: load(i, t) for i, t in enumerate(recipe.teachers.teachers)}
    except PlanError:
        if payload in ("hidden_states", "local"):
            raise
        teachers = {}
    topk = 12 * min(recipe.algorithm.topk, spec.vocab_size)
    per_token = {"sampled": 4, "topk": topk, "student_topk": topk}
    if teachers:
        width = max(t.hidden_size for t in teachers.values())
        dtype = 2 if all(t.hidden_dtype == "bfloat16" for t in recipe.teachers.teachers) else 4
        per_token["hidden_states"] = width * dtype
    scored = shape.sequences * recipe.rollout.max_new_tokens
    p = recipe.parallel
    trainer = 0
    if payload == "hidden_states":
        heads = sum(padded_vocab // p.tp * t.hidden_size * 4 for t in teachers.values())
        trainer = heads + p.micro_batch_size * shape.seq_len * width * dtype
    elif payload == "local":
        dtype_bytes = 2 if recipe.model.dtype == "bfloat16" else 4
        trainer = sum(model_params(t).total * dtype_bytes // (p.tp * p.pp * p.ep)
                      for t in teachers.values())
    return PayloadPlan(payload, per_token, scored * per_token.get(payload, 0), trainer)
