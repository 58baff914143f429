"""MOPD losses over the student's vocabulary-parallel logits.

Every variant has the MiMo-V2-Flash shape (eq. 7): a per-token term, gated by IcePop,
averaged over each sequence's generated tokens (1/|y|), then summed over sequences; the
training step divides by the number of sequences across micro-batches and DP ranks, so the
result is the mean over sequences whatever the layout.

- `pg` (the paper's default): term_t = −w_t · Â_t · log π_θ(y_t), with
  Â_t = clip(sg[log π_T(y_t) − log π_θ(y_t)], ±A_max) + α·Â_ORM. Only the teacher's
  log-prob of the sampled token is needed.
- `topk`: the corrected teacher top-k reverse KL (MOPD paper eq. 5),
  term_t = w_t · Σ_{v∈TopK(π_T)} [π_θ(v) log(π_θ(v)/π_T(v)) − π_θ(v) + π_T(v)], plus the
  outcome term −w_t·α·Â_ORM·log π_θ(y_t) when α > 0. With k ≥ |V| it is the exact reverse KL.
- `full_rkl` / `forward_kl`: exact KL(π_θ‖π_T) / KL(π_T‖π_θ) over the whole vocabulary from a
  local teacher's logits at the student's TP layout, plus the same outcome term.
- `grpo` (the RL baselines, no teacher): term_t = −w_t · Â_ORM · log π_θ(y_t).

The vocabulary-wide quantities all come from `mopd_megatron.kernels`; nothing here gathers
the vocabulary. Batch fields are aligned with the logits: position t holds the target
token y = tokens[t+1] and everything about it (see `mopd.batch`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..config import AlgorithmConfig
from ..kernels import topk_reverse_kl, vocab_parallel_kl, vocab_parallel_logprob_entropy
from .advantages import teacher_advantages
from .icepop import icepop_weights

LossFn = Callable[[Tensor, dict], tuple[Tensor, Tensor, dict]]


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """(1/|y|) Σ_t values[b, t] over the masked tokens of each row: [B, S] -> [B]."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _distill_term(logits: Tensor, mb: dict, cfg: AlgorithmConfig, **kernel_kw) -> Tensor:
    """Per-token teacher divergence [B, S] for the top-k and full-vocabulary variants."""
    b, s, v = logits.shape
    flat = logits.reshape(b * s, v)
    if cfg.loss == "topk":
        k = mb["teacher_topk_ids"].shape[-1]
        kl = topk_reverse_kl(
            flat,
            mb["teacher_topk_ids"].reshape(b * s, k),
            mb["teacher_topk_logprobs"].reshape(b * s, k),
            **kernel_kw,
        )
    else:
        kind = "reverse" if cfg.loss == "full_rkl" else "forward"
        kl = vocab_parallel_kl(
            flat,
            mb["teacher_logits"].reshape(b * s, -1),
            kind=kind,
            loss_mask=mb["loss_mask"].reshape(-1),
            tp_group=kernel_kw["tp_group"],
            student_temperature=kernel_kw["temperature"],
            vocab_size=kernel_kw["vocab_size"],
        )
    return kl.view(b, s)


def mopd_loss(
    logits: Tensor,
    mb: dict,
    cfg: AlgorithmConfig,
    *,
    tp_group=None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    num_domains: int = 1,
) -> tuple[Tensor, Tensor, dict]:
    """The MOPD loss of one micro-batch.

    Args:
        logits: [B, S, V_local] this rank's vocabulary shard of the student's logits.
        mb: micro-batch from `mopd.batch.build_batch`: targets, loss_mask, behaviour_logprobs,
            orm_advantages [B], domain_ids [B], and per variant teacher_logprobs,
            teacher_topk_ids/teacher_topk_logprobs, or teacher_logits.
        cfg: the algorithm stage of the recipe.
        tp_group: tensor-parallel group the vocabulary is split over.
        vocab_size: the real vocabulary size (Megatron's padded columns are masked).
        temperature: the rollout temperature, so that π_θ matches μ_θ in the IcePop ratio.
        num_domains: domains are reported separately in the metrics.

    Returns:
        (loss_sum over sequences, number of sequences, metric sums).
    """
    b, s, v = logits.shape
    kernel_kw = dict(tp_group=tp_group, temperature=temperature, vocab_size=vocab_size)
    logprob, entropy = vocab_parallel_logprob_entropy(
        logits.reshape(b * s, v), mb["targets"].reshape(-1), **kernel_kw
    )
    logprob, entropy = logprob.view(b, s), entropy.view(b, s)
    mask = mb["loss_mask"].float()
    weights, gated = icepop_weights(
        logprob, mb["behaviour_logprobs"], cfg.icepop_low, cfg.icepop_high
    )
    weights = weights * mask
    orm = cfg.orm_coef * mb["orm_advantages"].float()[:, None]
    if cfg.loss == "grpo":
        advantages = mb["orm_advantages"].float()[:, None].expand(b, s)
        per_token = -weights * advantages * logprob
        token_kl = torch.zeros_like(logprob)
    elif cfg.loss == "pg":
        advantages = teacher_advantages(mb["teacher_logprobs"], logprob, cfg.adv_clip) + orm
        per_token = -weights * advantages * logprob
        token_kl = (logprob - mb["teacher_logprobs"]).detach()  # sampled-token estimate k1
    else:
        token_kl = _distill_term(logits, mb, cfg, **kernel_kw)
        advantages = orm.expand(b, s)
        per_token = weights * token_kl - weights * advantages * logprob
        token_kl = token_kl.detach()
    loss_sum = sequence_mean(per_token, mask).sum()
    num_sequences = (mask.sum(-1) > 0).sum()
    metrics = _metrics(mask, token_kl, entropy, gated, advantages, mb, num_domains)
    return loss_sum, num_sequences, metrics


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
