"""The training objectives: one class per loss variant, chosen once from the recipe.

Each objective says what it needs from the rollout side (`needs`) and computes its loss over
the student's vocabulary-parallel logits. Every variant has the MiMo-V2-Flash shape (eq. 7):
a per-token term, gated by IcePop, averaged over each sequence's generated tokens (1/|y|),
then summed over sequences; the training step divides by the number of sequences across
micro-batches and DP ranks, so the result is the mean over sequences whatever the layout.

- `pg` (the paper's default): term_t = −w_t · Â_t · log π_θ(y_t), with
  Â_t = clip(sg[log π_T(y_t) − log π_θ(y_t)], ±A_max) + α·Â_ORM. Only the teacher's
  log-prob of the sampled token is needed.
- `topk`: the corrected teacher top-k reverse KL (MOPD paper eq. 5),
  term_t = w_t · Σ_{v∈TopK(π_T)} [π_θ(v) log(π_θ(v)/π_T(v)) − π_θ(v) + π_T(v)], plus the
  outcome term −w_t·α·Â_ORM·log π_θ(y_t) when α > 0. With k ≥ |V| it is the exact reverse KL.
  With the `student_topk` payload the same sum runs over the student's own top-k instead
  (support = the sampling engine's top-k of the student's temperature-scaled distribution at
  that position, μ_θ's), each v with the teacher's log π_T(v) from `token_ids_logprob`: the
  teacher sends k values per position, never computes its own top-k, and the support is
  where the student puts its mass, which is where reverse KL is large.
- `full_rkl` / `forward_kl`: exact KL(π_θ‖π_T) / KL(π_T‖π_θ) over the whole vocabulary from
  teacher logits at the student's TP layout (a local teacher's, or a served teacher's hidden
  states times its LM-head shard), plus the same outcome term.
- `grpo` (the RL baselines, no teacher): term_t = −w_t · Â_ORM · log π_θ(y_t).
- `sft` (off-policy fine-tuning, e.g. RFT on verified teacher samples): the token-mean
  cross-entropy −Σ_{b,t} m log π_θ(y) / Σ m, with the token as the unit and no IcePop gate
  (the samples did not come from the student's engine).

Why the policy gradient is the distillation loss: with Â_t = log π_T − log π_θ held fixed,
the gradient of −Â_t log π_θ(y_t) over sampled y is the gradient of the reverse KL
KL(π_θ‖π_T) estimated on the student's own samples, which is what on-policy distillation
minimises. π_θ is always the trainer's log-prob recomputed in this forward pass, and μ_θ (the
engine's, at sampling time) enters only through the IcePop ratio π_θ/μ_θ.

Under staleness (`rollout.max_staleness` = k ≥ 1, `async_rollout.py`) the batch trained at
step s was sampled by θ_v, v ≥ s − 1 − k, while the trainer holds θ = θ_{s−1}. The estimator
is unchanged in form and every θ-dependent term is the current one:
    μ = μ_{θ_v} (the engine's log-probs as it sampled, the behaviour policy),
    Â_t = clip(sg[log π_T(y_t) − log π_θ(y_t)], ±A_max) + α·Â_ORM,
    w_t = sg[π_θ/μ] if ε_low ≤ π_θ/μ ≤ ε_high else 0,
with log π_θ recomputed in this forward pass, never taken from the sampler. So the advantage
is the current student's distance to the teacher (MiMo-V2-Flash eq. 8), which is what fixes
reverse KL under stale rollouts (AsyncOPD, arXiv 2606.24143), and the IcePop ratio now
measures the policy lag plus the engine mismatch. Inside the gate w = π_θ/μ is the per-token
importance weight from θ_v's samples to θ's, so E_{y∼μ}[w · ∇(−Â log π_θ)] estimates the
current student's reverse-KL gradient (per-token ratios, as in PPO-style estimators); tokens
on which θ_v and θ disagree beyond [ε_low, ε_high] are dropped, trading that bias for bounded
variance. The bound k keeps the lag, and so the gated fraction, small (`icepop/gated`).

The vocabulary-wide quantities all come from `mopd_megatron.kernels`; nothing here gathers
the vocabulary. Batch fields are aligned with the logits: position t holds the target
token y = tokens[t+1] and everything about it (see `mopd.batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import AlgorithmConfig
from ..kernels import topk_reverse_kl, vocab_parallel_kl, vocab_parallel_logprob_entropy
from .advantages import teacher_advantages
from .icepop import icepop_weights


@dataclass(frozen=True)
class RolloutNeeds:
    """What an objective asks of the rollout side (teachers, verifiers, sampling)."""

    teacher_logprobs: bool = False
    """The teacher's log-prob of each sampled token (a served teacher's prefill)."""
    teacher_top_k: int = 0
    """The teacher's top-k log-probs at each response position (0 = none)."""
    student_top_k: int = 0
    """The teacher's log-probs at the rollout engine's top-k of the student at each response
    position (0 = none; the `student_topk` payload)."""
    local_teacher_logits: bool = False
    """Full-vocabulary teacher logits, computed in the trainer by local teacher models."""
    teacher_hidden_states: bool = False
    """The teacher's final hidden state at each response position (served teachers); the
    trainer applies the teacher's LM-head shard to get full-vocabulary logits."""

    @property
    def queries_teachers(self) -> bool:
        return self.teacher_logprobs or self.topk_width > 0 or self.teacher_hidden_states

    @property
    def topk_width(self) -> int:
        """Entries per position of the batch's `teacher_topk_*` fields (0 = none)."""
        return max(self.teacher_top_k, self.student_top_k)


@dataclass(frozen=True)
class LossContext:
    """What every loss needs from the student and the run besides the logits."""

    vocab_size: int
    """The real vocabulary size (Megatron's padded columns are masked)."""
    temperature: float = 1.0
    """The rollout temperature, so that π_θ matches μ_θ in the IcePop ratio."""
    tp_group: Any = None
    """The tensor-parallel group the vocabulary is split over."""
    num_domains: int = 1
    """Domains are reported separately in the metrics."""
    teacher_payload: str = ""
    """What the teachers send, when the recipe chooses (`teachers.teachers[i].payload`; ""
    = the objective's default, `Objective.payloads[0]`)."""


def token_logprob_entropy(logits: Tensor, targets: Tensor, *, tp_group=None,
                          temperature: float = 1.0, vocab_size: int | None = None):
    """log π(targets) and the entropy of π, [B, S] each, from the vocabulary shard
    [B, S, V_local] of the logits (identical on every TP rank; padded columns masked)."""
    b, s, v = logits.shape
    logprob, entropy = vocab_parallel_logprob_entropy(
        logits.reshape(b * s, v), targets.reshape(-1), tp_group=tp_group,
        temperature=temperature, vocab_size=vocab_size,
    )
    return logprob.view(b, s), entropy.view(b, s)


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """(1/|y|) Σ_t values[b, t] over the masked tokens of each row: [B, S] -> [B]."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


class Objective:
    """One loss variant. Call it on (logits [B, S, V_local], micro-batch) to get
    (loss_sum, number of units, metric sums), the contract of `Student.step`."""

    name: ClassVar[str]
    kernel_passes: ClassVar[int] = 1
    """Vocabulary-wide kernel passes per micro-batch (the planner counts their buffers)."""
    min_samples_per_prompt: ClassVar[int] = 1
    """Group-normalised outcome advantages compare the samples of one prompt."""
    trains_on_fixed_samples: ClassVar[bool] = False
    """Learns from fixed (e.g. verified teacher) samples rather than the student's own."""
    payloads: ClassVar[tuple[str, ...]] = ()
    """Teacher payloads this loss can train on, its default first (`TeacherConfig.payload`;
    "local" = the teacher runs inside the trainer); () = no teacher."""

    def __init__(self, cfg: AlgorithmConfig, ctx: LossContext):
        self.cfg, self.ctx = cfg, ctx

    @property
    def needs(self) -> RolloutNeeds:
        return RolloutNeeds()

    def token_terms(self, logits: Tensor, mb: dict, logprob: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(divergence term [B, S] to add w-weighted, advantages [B, S], KL metric [B, S])."""
        raise NotImplementedError

    def __call__(self, logits: Tensor, mb: dict) -> tuple[Tensor, Tensor, dict]:
        logprob, entropy = self._logprob_entropy(logits, mb, self.ctx.temperature)
        mask = mb["loss_mask"].float()
        weights, gated = icepop_weights(
            logprob, mb["behaviour_logprobs"], self.cfg.icepop_low, self.cfg.icepop_high
        )
        weights = weights * mask
        divergence, advantages, token_kl = self.token_terms(logits, mb, logprob)
        per_token = weights * divergence - weights * advantages * logprob
        loss_sum = sequence_mean(per_token, mask).sum()
        num_sequences = (mask.sum(-1) > 0).sum()
        metrics = _metrics(mask, token_kl, entropy, gated, advantages, mb, self.ctx.num_domains)
        # |log π_θ − log μ_θ|: the engine/trainer mismatch IcePop gates (routing replay shrinks it)
        gap = (logprob.detach() - mb["behaviour_logprobs"]).abs()
        metrics["logprob_gap_sum"] = (gap * mask).sum()
        return loss_sum, num_sequences, metrics

    def _logprob_entropy(self, logits: Tensor, mb: dict, temperature: float):
        return token_logprob_entropy(logits, mb["targets"], tp_group=self.ctx.tp_group,
                                     temperature=temperature, vocab_size=self.ctx.vocab_size)

    def _outcome(self, mb: dict, shape: torch.Size) -> Tensor:
        """α · Â_ORM broadcast over the tokens of each sequence."""
        return (self.cfg.orm_coef * mb["orm_advantages"].float()[:, None]).expand(shape)


class PolicyGradient(Objective):
    name, payloads = "pg", ("sampled",)

    @property
    def needs(self) -> RolloutNeeds:
        return RolloutNeeds(teacher_logprobs=True)

    def token_terms(self, logits, mb, logprob):
        advantages = teacher_advantages(mb["teacher_logprobs"], logprob, self.cfg.adv_clip)
        advantages = advantages + self._outcome(mb, logprob.shape)
        token_kl = (logprob - mb["teacher_logprobs"]).detach()  # sampled-token estimate k1
        return torch.zeros_like(logprob), advantages, token_kl


class OutcomeOnly(Objective):
    name, min_samples_per_prompt = "grpo", 2

    def token_terms(self, logits, mb, logprob):
        advantages = mb["orm_advantages"].float()[:, None].expand(logprob.shape)
        zeros = torch.zeros_like(logprob)
        return zeros, advantages, zeros


class TopKReverseKL(Objective):
    name, kernel_passes, payloads = "topk", 2, ("topk", "student_topk")

    @property
    def needs(self) -> RolloutNeeds:
        # A top-k at least the vocabulary is the whole distribution (exact reverse KL).
        k = min(self.cfg.topk, self.ctx.vocab_size)
        if self.ctx.teacher_payload == "student_topk":
            return RolloutNeeds(student_top_k=k)
        return RolloutNeeds(teacher_top_k=k)

    def token_terms(self, logits, mb, logprob):
        b, s, v = logits.shape
        k = mb["teacher_topk_ids"].shape[-1]
        kl = topk_reverse_kl(
            logits.reshape(b * s, v), mb["teacher_topk_ids"].reshape(b * s, k),
            mb["teacher_topk_logprobs"].reshape(b * s, k), tp_group=self.ctx.tp_group,
            temperature=self.ctx.temperature, vocab_size=self.ctx.vocab_size,
        ).view(b, s)
        return kl, self._outcome(mb, logprob.shape), kl.detach()


class FullVocabKL(Objective):
    """Exact reverse (`full_rkl`) or forward (`forward_kl`) KL against full-vocabulary teacher
    logits at the student's TP layout: from local teacher models, or from served teachers'
    hidden states through each teacher's LM-head shard (`student.teacher_heads`)."""

    kind: ClassVar[str]
    kernel_passes, payloads = 2, ("local", "hidden_states")

    @property
    def needs(self) -> RolloutNeeds:
        if self.ctx.teacher_payload == "hidden_states":
            return RolloutNeeds(teacher_hidden_states=True)
        return RolloutNeeds(local_teacher_logits=True)

    def token_terms(self, logits, mb, logprob):
        b, s, v = logits.shape
        kl = vocab_parallel_kl(
            logits.reshape(b * s, v), mb["teacher_logits"].reshape(b * s, -1), kind=self.kind,
            loss_mask=mb["loss_mask"].reshape(-1), tp_group=self.ctx.tp_group,
            student_temperature=self.ctx.temperature, vocab_size=self.ctx.vocab_size,
        ).view(b, s)
        return kl, self._outcome(mb, logprob.shape), kl.detach()


class FullReverseKL(FullVocabKL):
    name, kind = "full_rkl", "reverse"


class ForwardKL(FullVocabKL):
    name, kind = "forward_kl", "forward"


class SupervisedFineTuning(Objective):
    """Token-mean cross-entropy on fixed trajectories: loss_sum = −Σ m·log π_θ(y), units = Σ m."""

    name, trains_on_fixed_samples = "sft", True

    def __call__(self, logits: Tensor, mb: dict) -> tuple[Tensor, Tensor, dict]:
        logprob, _ = self._logprob_entropy(logits, mb, temperature=1.0)
        mask = mb["loss_mask"].float()
        nll = -(logprob * mask).sum()
        tokens = mask.sum()
        return nll, tokens, {"tokens": tokens.detach(), "nll_sum": nll.detach()}


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (PolicyGradient, TopKReverseKL, FullReverseKL, ForwardKL, OutcomeOnly,
                SupervisedFineTuning)
}


def objective_class(cfg: AlgorithmConfig) -> type[Objective]:
    """The objective `algorithm.loss` names: the one place the loss name is read."""
    return OBJECTIVES[cfg.loss]


def build_objective(cfg: AlgorithmConfig, ctx: LossContext) -> Objective:
    return objective_class(cfg)(cfg, ctx)


def _metrics(mask, token_kl, entropy, gated, advantages, mb, num_domains) -> dict[str, Tensor]:
    """Sums over tokens (and counts), so that they add up across micro-batches and ranks."""
    with torch.no_grad():
        tokens_per_seq = mask.sum(-1)
        metrics = {
            "tokens": tokens_per_seq.sum(),
            "kl_sum": (token_kl * mask).sum(),
            "entropy_sum": (entropy.detach() * mask).sum(),
            "icepop_gated": (gated.float() * mask).sum(),
            "adv_sum": (advantages * mask).sum(),
            "adv_sq_sum": (advantages**2 * mask).sum(),
        }
        seq_kl = (token_kl * mask).sum(-1)
        for d in range(num_domains):
            in_domain = (mb["domain_ids"] == d).float()
            metrics[f"kl_sum/{d}"] = (seq_kl * in_domain).sum()
            metrics[f"tokens/{d}"] = (tokens_per_seq * in_domain).sum()
    return metrics
