"""Sync stage, by tensor: send the student's weights over HTTP, bucket by bucket.

Consumes buckets of (HF checkpoint name, tensor); produces, inside one SGLang weight-update
session (/begin_weight_update ... /end_weight_update, which SGLang 0.5.23 requires), one
POST /update_weights_from_tensor per bucket (the client picks the payload format the server
takes: base64 safetensors for the embedded engine, SGLang's CUDA IPC pickle for a real
SGLang on the same node), then one /flush_cache. Bucket size bounds the peak memory of a
push (slime uses ~512 MB buckets for MoE models).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mopd_megatron.rollout.client import EngineClient

Bucket = list[tuple[str, torch.Tensor]]
"""A group of weights sent together: (HF checkpoint name, tensor) pairs."""


class TensorSync:
    """Push weights in the body of /update_weights_from_tensor requests.

    Args:
        client: The rollout engine's client.
    """

    def __init__(self, client: EngineClient):
        self.client = client

    def push(self, buckets: Iterable[Bucket], weight_version: str | None = None) -> None:
        """Send each non-empty bucket in one session, then flush the engine's prefix cache."""
        with self.client.weight_update_session():
            for bucket in buckets:
                if bucket:
                    self.client.update_weights_from_tensor(bucket, flush_cache=False,
                                                           weight_version=weight_version)
        self.client.flush_cache()
