"""Toy world, tasks: the demo's verifiable domains and their train / dev / test prompt sets.

Domains live in a registry (`register_toy_domain`), so other modules add their own. Built in:

- `add`: `37+48=` -> `85` (a, b uniform in 0-99);
- `rev`: `rev qwxkz=` -> `zkxwq` (3-8 random lower-case letters);
- `sort`: `sort qwxkz=` -> `kqwxz`;
- the open-answer domains `carry`, `spread`, `mix` (`demo.open_tasks`): many correct answers
  of up to 19 characters, checked by verifiers that read the task from the prompt.

Every prompt ends with '=' and every answer fits in its domain's `max_new_tokens` with <eos>.
The dev and test sets are drawn first and never trained on: the train set and the SFT
example stream (`ExampleStream`) skip every held-out prompt. Records are `data.PromptRecord`s
with the domain's verifier.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mopd_megatron.data import PromptRecord
from mopd_megatron.demo import open_tasks

DOMAINS = ("add", "rev", "sort")
"""The exact-answer domains of the demo's default world."""
MAX_NEW_TOKENS = 9
"""The longest exact answer (8 letters) plus <eos>."""


@dataclass(frozen=True)
class ToyDomain:
    """A toy domain: how to draw an example and how its answers are checked."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    """rng -> (prompt ending in '=', one correct answer)."""
    verifier: str
    """Name of its verifier in `mopd.rewards` (registered there)."""
    max_new_tokens: int
    """The longest answer plus <eos>."""


TOY_DOMAINS: dict[str, ToyDomain] = {}


def register_toy_domain(domain: ToyDomain) -> None:
    """Make `domain` available to `make_example`, the world settings and the splits."""
    TOY_DOMAINS[domain.name] = domain


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randrange(100), rng.randrange(100)
    return f"{a}+{b}=", str(a + b)


def _rev(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"rev {word}=", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    word = _word(rng)
    return f"sort {word}=", "".join(sorted(word))


for _domain in (
    ToyDomain("add", _add, "exact", MAX_NEW_TOKENS),
    ToyDomain("rev", _rev, "exact", MAX_NEW_TOKENS),
    ToyDomain("sort", _sort, "exact", MAX_NEW_TOKENS),
    ToyDomain("carry", open_tasks.carry, "worked_sum", 20),
    ToyDomain("spread", open_tasks.spread, "spread", 8),
    ToyDomain("mix", open_tasks.mix, "interleaving", 11),
):
    register_toy_domain(_domain)


def toy_domain(name: str) -> ToyDomain:
    """The registered domain called `name`."""
    if name not in TOY_DOMAINS:
        raise ValueError(f"unknown toy domain {name!r}; known: {sorted(TOY_DOMAINS)}")
    return TOY_DOMAINS[name]


def make_example(domain: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair of `domain`, drawn with `rng`."""
    return toy_domain(domain).make(rng)


def max_new_tokens(domains: Iterable[str]) -> int:
    """Enough new tokens for every answer of `domains` plus <eos>."""
    return max(toy_domain(d).max_new_tokens for d in domains)


def make_splits(
    domains: Iterable[str], seed: int, n_train: int, n_dev: int, n_test: int
) -> dict[str, list[PromptRecord]]:
    """Disjoint test, dev and train prompt sets, `n_*` unique prompts per domain each.

    Args:
        domains: toy domains to include.
        seed: the data seed.
        n_train: train prompts per domain (fewer for `add` and `carry` if their 10,000
            prompts run out).
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
                        verifier=toy_domain(domain).verifier,
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

    def __init__(self, held_out: Iterable[PromptRecord], seed: int | str):
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
