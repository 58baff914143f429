"""Supervised fine-tuning on the Megatron student: (prompt, response) token ids -> train steps.

Consumes fixed trajectories (prompt ids + response ids, e.g. verified teacher samples) and
produces optimizer steps through `student.train_step`, at any layout. Trajectories are
collated by `mopd.batch.build_batch` (the one place that aligns per-token fields with the
logits), and the loss follows `train_step`'s contract with the token as the unit:

    loss_sum = −Σ_{b,t} m_{b,t} log π_θ(y_{b,t}),  num_units = Σ_{b,t} m_{b,t}

so the update is the token-mean cross-entropy over the batch's response tokens
(m = loss_mask, y = targets), whatever the layout or the number of micro-batches.
`EpochBatches` hands out batches of a fixed size from a shuffled pool, epoch after epoch.
"""

from __future__ import annotations

import random

from torch import Tensor

from mopd_megatron.kernels import vocab_parallel_logprob_entropy
from mopd_megatron.mopd.batch import build_batch
from mopd_megatron.trajectory import Trajectory


def sft_loss(
    logits: Tensor, mb: dict, *, vocab_size: int, tp_group=None
) -> tuple[Tensor, Tensor, dict]:
    """Token-sum cross-entropy of one micro-batch (see the module docstring).

    Args:
        logits: [b, s, V_local] this TP rank's vocabulary shard.
        mb: the micro-batch (`targets`, `loss_mask` [b, s]).
        vocab_size: the real vocabulary size (padded columns are masked).
        tp_group: the tensor-parallel group the vocabulary is split over.

    Returns:
        (loss_sum, number of response tokens, {"tokens", "nll_sum"}).
    """
    b, s, v = logits.shape
    logprob, _ = vocab_parallel_logprob_entropy(
        logits.reshape(b * s, v),
        mb["targets"].reshape(-1),
        tp_group=tp_group,
        vocab_size=vocab_size,
    )
    mask = mb["loss_mask"].float()
    nll = -(logprob.view(b, s) * mask).sum()
    tokens = mask.sum()
    return nll, tokens, {"tokens": tokens.detach(), "nll_sum": nll.detach()}


def sft_batch(trajectories: list[Trajectory], pad_id: int, domains: list[str]) -> dict:
    """The tensor batch (tokens, targets, loss_mask, ...) of fixed trajectories."""
    return build_batch(trajectories, pad_id=pad_id, domains=domains)


class EpochBatches:
    """Batches of `size` items from a pool, reshuffled every epoch (deterministic by seed).

    Args:
        items: the pool (e.g. verified trajectories).
        size: items per batch.
        seed: the shuffling seed.
    """

    def __init__(self, items: list, size: int, seed: int):
        if not items:
            raise ValueError("no items to fine-tune on")
        self.items, self.size, self.seed = items, size, seed
        self.epoch, self.order, self.position = 0, self._order(0), 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list:
        """The next `size` items (crossing into the next epoch when the pool runs out)."""
        batch = []
        while len(batch) < self.size:
            if self.position == len(self.order):
                self.epoch += 1
                self.order, self.position = self._order(self.epoch), 0
            batch.append(self.items[self.order[self.position]])
            self.position += 1
        return batch
