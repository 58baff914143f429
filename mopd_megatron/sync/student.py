"""Sync stage, from the Megatron student: export on every rank, push from the engine owner.

`export_hf_weights` gathers the student's shards (TP/EP/PP) into full HF-named tensors with
collectives, so every rank iterates it; the rank that owns the rollout engine (global rank
0) pushes each bucket as it arrives, so at most one bucket is held at a time. Then the
trainer's log-probs on a few fixed probe sequences are compared with the engine's: after a
correct sync the gap is float noise, and it is the train/inference mismatch IcePop gates.
"""

from __future__ import annotations

import torch

from ..hf.megatron_io import export_hf_weights
from ..student.forward import forward_logprobs

BUCKET_BYTES = 256 << 20
"""Weights per push (slime uses ~512 MB buckets for MoE models)."""


def push_student_weights(model_chunks, spec, weight_sync, version: str) -> None:
    """Export the student's weights; `weight_sync` (None off the engine owner) pushes them."""
    for bucket in export_hf_weights(model_chunks, spec, BUCKET_BYTES):
        if weight_sync is not None:
            weight_sync.push([bucket], weight_version=version)


def probe_sync_gap(model_chunks, spec, engine, probe_tokens: torch.Tensor) -> float | None:
    """Max |log p_engine − log p_trainer| over probe sequences (all ranks call; owner returns).

    Args:
        model_chunks: the student (every rank runs the forward).
        spec: the student's HFModelSpec (real vocabulary size).
        engine: the rollout engine's client on the owner rank, None elsewhere.
        probe_tokens: [P, S] token ids without padding (the same on every rank).
    """
    logprobs, _ = forward_logprobs(model_chunks, {"tokens": probe_tokens}, len(probe_tokens),
                                   vocab_size=spec.vocab_size)
    if engine is None:
        return None
    sequences = probe_tokens.tolist()
    scores = engine.score(sequences, [1] * len(sequences))
    trainer = logprobs[:, : probe_tokens.shape[1] - 1]  # position t scores token t + 1
    return max(
        float((torch.tensor(s.token_logprobs) - trainer[i]).abs().max())
        for i, s in enumerate(scores)
    )
