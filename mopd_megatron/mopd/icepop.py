"""IcePop: the train/inference mismatch gate.

    w_t = sg[π_θ(y_t) / μ_θ(y_t)]  if ε_low ≤ π_θ/μ_θ ≤ ε_high,  else 0

μ_θ is the same student as served by the rollout engine (which sampled y), π_θ the student in
the training engine. The ratio is an importance weight correcting for the two engines'
numerical differences; tokens where they disagree too much are discarded rather than
clipped (a gate, not truncated IS). Both log-probs must be at the sampling temperature.
"""

from __future__ import annotations

import torch
from torch import Tensor


def icepop_weights(
    train_logprobs: Tensor, behaviour_logprobs: Tensor, low: float, high: float
) -> tuple[Tensor, Tensor]:
    """Return (w, gated): the detached gate weights and a bool tensor of discarded tokens."""
    ratio = torch.exp(train_logprobs.detach().float() - behaviour_logprobs.float())
    gated = (ratio < low) | (ratio > high)
    return torch.where(gated, torch.zeros_like(ratio), ratio), gated
