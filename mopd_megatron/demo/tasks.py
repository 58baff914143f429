"""Toy world, tasks: the demo's verifiable domains and their train / dev / test prompt sets.

- `add`: `37+48=` -> `85` (a, b uniform in 0-99);
- `rev`: `rev qwxkz=` -> `zkxwq` (3-8 random lower-case letters);
- `sort`: `sort qwxkz=` -> `kqwxz`.

Every prompt ends with '=' and every answer fits in `MAX_NEW_TOKENS` tokens with <eos>.
The dev and test sets are drawn first and never trained on: the train set and the SFT
example stream (`ExampleStream`) skip every held-out prompt. Records are `data.PromptRecord`s
with `verifier="exact"`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable

from mopd_megatron.data import PromptRecord

DOMAINS = ("add", "rev", "sort")
MAX_NEW_TOKENS = 9
"""The longest answer (8 letters) plus <eos>."""


def make_example(domain: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair of `domain`, drawn with `rng`."""
    if domain == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        return f"{a}+{b}=", str(a + b)
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
    if domain == "rev":
        return f"rev {word}=", word[::-1]
    if domain == "sort":
        return f"sort {word}=", "".join(sorted(word))
    raise ValueError(f"unknown toy domain {domain!r}; known: {DOMAINS}")


def make_splits(
    domains: Iterable[str], seed: int, n_train: int, n_dev: int, n_test: int
) -> dict[str, list[PromptRecord]]:
    """Disjoint test, dev and train prompt sets, `n_*` unique prompts per domain each.

    Args:
        domains: toy domains to include.
        seed: the data seed.
        n_train: train prompts per domain (fewer for `add` if its 10,000 prompts run out).
        n_dev: dev prompts per domain.
        n_test: test prompts per domain.

    Returns:
        {"train": records, "dev": records, "test": records}, domains in the given order.
    """
    splits: dict[str, list[PromptRecord]] = {"train": [], "dev": [], "test": []}
    for domain in domains:
        rng = random.Random(f"{seed}:splits:{domain}")
        seen: set[str] = set()
        for split, count in (("test", n_test), ("dev", n_dev), ("train", n_train)):
            misses = 0
            taken = 0
            while taken < count and misses < 100_000:
                prompt, answer = make_example(domain, rng)
                if prompt in seen:
                    misses += 1
                    continue
                seen.add(prompt)
                taken += 1
                splits[split].append(
                    PromptRecord(
                        domain=domain,
                        prompt=prompt,
                        answer=answer,
                        verifier="exact",
                        id=f"{split}/{domain}/{taken - 1}",
                    )
                )
    return splits


class ExampleStream:
    """Fresh (prompt, answer) SFT examples per domain that skip the held-out prompts.

    Args:
        held_out: records never to train on (dev and test).
        seed: the stream's seed.
    """

    def __init__(self, held_out: Iterable[PromptRecord], seed: int):
        self.held_out = {r.prompt for r in held_out}
        self.rng = random.Random(f"{seed}:stream")

    def draw(self, weights: dict[str, float], count: int) -> list[tuple[str, str]]:
        """`count` examples; each one's domain is drawn with the given (relative) weights."""
        domains = self.rng.choices(list(weights), list(weights.values()), k=count)
        return [self._fresh(domain) for domain in domains]

    def _fresh(self, domain: str) -> tuple[str, str]:
        while True:
            prompt, answer = make_example(domain, self.rng)
            if prompt not in self.held_out:
                return prompt, answer
