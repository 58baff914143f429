"""Data stage, sampling: prompt records -> one batch of `prompts_per_step` prompts per step.

Each slot of a step's batch draws its domain from the mixing weights (the paper mixes
math : IF : SWE = 0.35 : 0.35 : 0.30), then takes that domain's next prompt. Every domain
walks through its prompts in a shuffled order, reshuffled each epoch. Everything is a pure
function of (seed, step, per-domain cursor), so `state_dict()` is three small values and
`load_state_dict()` resumes an interrupted run at exactly the same data position.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

from mopd_megatron.data.records import PromptRecord


class DomainMixSampler:
    """Draws mixed-domain prompt batches, deterministic given a seed and resumable.

    Args:
        records: the prompt pool (all domains).
        prompts_per_step: prompts per batch.
        domain_weights: sampling weight per domain (normalised here); empty or None = the
            natural mix (each domain's share of the pool). Domains left out are not sampled.
        seed: the data seed.
    """

    def __init__(
        self,
        records: list[PromptRecord],
        prompts_per_step: int,
        domain_weights: dict[str, float] | None = None,
        seed: int = 0,
    ):
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self.pools: dict[str, list[PromptRecord]] = {}
        for record in records:
            self.pools.setdefault(record.domain, []).append(record)
        if not self.pools:
            raise ValueError("DomainMixSampler needs at least one prompt")
        weights = domain_weights or {d: float(len(p)) for d, p in self.pools.items()}
        unknown = sorted(set(weights) - set(self.pools))
        if unknown:
            raise ValueError(f"domain_weights name domains with no prompts: {unknown}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"domain_weights must be >= 0 with a positive sum, got {weights}")
        total = sum(weights.values())
        self.weights = {d: w / total for d, w in sorted(weights.items()) if w > 0}
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.step = 0
        self.cursors = {d: 0 for d in self.pools}
        self._orders: dict[str, tuple[int, list[int]]] = {}

    def next_batch(self) -> list[PromptRecord]:
        """The next step's prompts (`prompts_per_step` records, domains interleaved)."""
        rng = random.Random(f"{self.seed}:step:{self.step}")
        domains = rng.choices(
            list(self.weights), list(self.weights.values()), k=self.prompts_per_step
        )
        batch = [self._next_of(domain) for domain in domains]
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[list[PromptRecord]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The data position: plain ints and strings, safe to store in a checkpoint."""
        return {
            "seed": self.seed,
            "step": self.step,
            "cursors": dict(self.cursors),
            "pool_sizes": {d: len(p) for d, p in self.pools.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; the prompt pool must be the same as when it was saved."""
        sizes = {d: len(p) for d, p in self.pools.items()}
        if state["pool_sizes"] != sizes:
            raise ValueError(
                f"sampler state was saved for pools {state['pool_sizes']}, but the data has {sizes}"
            )
        self.seed, self.step = state["seed"], state["step"]
        self.cursors = dict(state["cursors"])
        self._orders.clear()

    def _next_of(self, domain: str) -> PromptRecord:
        pool = self.pools[domain]
        epoch, position = divmod(self.cursors[domain], len(pool))
        cached = self._orders.get(domain)
        if cached is None or cached[0] != epoch:
            order = list(range(len(pool)))
            random.Random(f"{self.seed}:{domain}:{epoch}").shuffle(order)
            self._orders[domain] = cached = (epoch, order)
        self.cursors[domain] += 1
        return pool[cached[1][position]]
