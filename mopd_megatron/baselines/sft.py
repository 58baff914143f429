"""Off-policy fine-tuning data: batches of a fixed size from a pool of fixed trajectories.

`EpochBatches` hands out batches from a shuffled pool (e.g. verified teacher samples for
RFT), epoch after epoch; the loss is `mopd.objectives.SupervisedFineTuning`.
"""

from __future__ import annotations

import random


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
