"""MOPD advantages: per-token teacher advantage plus a GRPO outcome advantage.

    Â_t = clip(sg[log π_T(y_t) − log π_θ(y_t)], −A_max, A_max) + α · Â_ORM

π_T is the prompt's domain teacher, π_θ the student in the training engine, Â_ORM the
verifier's reward normalised within the group of n samples of one prompt and broadcast over
the response tokens (MiMo-V2-Flash eqs. 8–9). Why the log-ratio is an advantage: the
per-token reverse KL E_{y~π_θ}[log π_θ − log π_T] has the policy gradient
E[(log π_θ − log π_T) ∇log π_θ], so a REINFORCE loss with reward log π_T − log π_θ minimises it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def teacher_advantages(teacher_logprobs: Tensor, student_logprobs: Tensor, clip: float) -> Tensor:
    """clip(sg[log π_T − log π_θ], ±clip), elementwise; no gradient flows through it."""
    return (teacher_logprobs - student_logprobs).detach().clamp(-clip, clip)


def grpo_advantages(rewards: Tensor, groups: Tensor, eps: float = 1e-6) -> Tensor:
    """Group-normalised outcome advantage (r − mean_g) / (std_g + eps) per sample.

    Args:
        rewards: [B] outcome rewards.
        groups: [B] integer id of the prompt each sample answers.
        eps: keeps groups whose rewards are all equal at advantage 0.

    Returns:
        [B] advantages; a group of one sample has advantage 0 (no baseline to compare with).
    """
    rewards = rewards.double()
    _, index, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=rewards.dtype).index_add_(0, index, rewards)
    means = sums / counts
    centred = rewards - means[index]
    sq = torch.zeros(len(counts), dtype=rewards.dtype).index_add_(0, index, centred**2)
    # Unbiased std as in GRPO; a single-sample group gets std 0 and centred reward 0.
    std = (sq / (counts - 1).clamp(min=1)).sqrt()
    return (centred / (std[index] + eps)).float()
