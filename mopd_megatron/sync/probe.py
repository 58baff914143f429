"""Sync stage, check: how far the engine's log-probs are from the trainer's after a sync.

Consumes fixed probe sequences and the trainer's log-probs of their tokens (temperature 1,
positions start..len-1, the same convention as `Scores.token_logprobs`); produces the
largest absolute gap |log p_engine - log p_trainer|. After a correct sync it is float noise
(~1e-5 in fp32, ~1e-2 in bf16); a stale or misnamed weight gives a gap of order 1. It
bounds the train/inference mismatch that the IcePop gate (pi_theta / mu_theta) filters.
"""

from __future__ import annotations

from collections.abc import Sequence

from mopd_megatron.rollout.client import EngineClient


def probe_gap(client: EngineClient, probe_sequences: Sequence[Sequence[int]],
              reference_logprobs: Sequence[Sequence[float]],
              response_starts: Sequence[int] | None = None) -> float:
    """Max |engine - reference| log-prob over the probe's scored positions.

    Args:
        client: The rollout engine's client.
        probe_sequences: Token ids of each probe sequence.
        reference_logprobs: The trainer's log p(seq[t] | seq[:t]) for t in start..len-1.
        response_starts: First scored position per sequence (default 1: all but the first).

    Returns:
        The largest absolute difference.
    """
    starts = list(response_starts) if response_starts is not None else [1] * len(probe_sequences)
    scores = client.score(probe_sequences, starts)
    gap = 0.0
    for i, (score, ref) in enumerate(zip(scores, reference_logprobs, strict=True)):
        if len(score.token_logprobs) != len(ref):
            raise ValueError(f"probe {i}: {len(ref)} reference log-probs for "
                             f"{len(score.token_logprobs)} scored positions")
        gap = max([gap] + [abs(a - float(b)) for a, b in zip(score.token_logprobs, ref)])
    return gap
