"""Student stage, local teachers: domain teachers as Megatron models at the student's layout.

The exact full-vocabulary losses (`full_rkl`, `forward_kl`) need the teacher's logits at
every position. A served teacher would have to ship [S, V] floats per sequence; instead each
teacher is built here with the student's TP/EP layout, so its logits come out with the same
vocabulary sharding [b, s, V_padded / tp] and the KL kernel compares the two shards rank by
rank without gathering the vocabulary. The teacher forward runs inside the student's loss on
the last pipeline stage, so this needs pp = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import build_student


class LocalTeachers:
    """Frozen teacher models, one per distinct checkpoint, routed by domain index.

    Args:
        paths: the teacher checkpoint of each domain, by domain index.
        model_cfg: the student's ModelConfig (dtype, vocab padding, MoE dispatcher).
        parallel_cfg: the student's ParallelConfig.
    """

    def __init__(self, paths: dict[int, str], model_cfg, parallel_cfg):
        if parallel_cfg.pp > 1:
            raise ValueError("full-vocabulary losses with local teachers need parallel.pp = 1")
        self.models: dict[str, torch.nn.Module] = {}
        self.domains: dict[str, list[int]] = {}
        for domain, path in sorted(paths.items()):
            if path not in self.models:
                (model,), _ = build_student(path, model_cfg, parallel_cfg)
                self.models[path] = model.eval().requires_grad_(False)
            self.domains.setdefault(path, []).append(domain)

    @torch.no_grad()
    def logits(self, tokens: Tensor, domain_ids: Tensor) -> Tensor:
        """[b, s, V_padded / tp] logits of each row's domain teacher.

        Every teacher runs on the whole micro-batch, so that all ranks of a TP / EP group run
        the same collectives whatever the domains in their rows.
        """
        out = None
        for path, model in self.models.items():
            logits = model(tokens, None, None)
            rows = torch.isin(domain_ids, torch.tensor(self.domains[path]))[:, None, None]
            out = logits if out is None else torch.where(rows, logits, out)
        return out

    def wrap(self, loss_fn):
        """`loss_fn` with the micro-batch's `teacher_logits` attached."""
        return with_teacher_logits(
            loss_fn, lambda mb: self.logits(mb["tokens"], mb["domain_ids"]))


def with_teacher_logits(loss_fn, teacher_logits):
    """`loss_fn(logits, micro_batch)` with `teacher_logits(micro_batch)` [b, s, V_padded / tp]
    added to the micro-batch as `teacher_logits` (the full-vocabulary losses read it)."""

    def loss(logits: Tensor, micro_batch: dict):
        return loss_fn(logits, {**micro_batch, "teacher_logits": teacher_logits(micro_batch)})

    return loss
