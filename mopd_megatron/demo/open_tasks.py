"""Toy world, open-answer domains: many correct answers, several formats, longer outputs.

Each generator draws a prompt and one answer from the "general SFT" distribution over the
correct answers, so a student trained on them learns a spread of valid styles, and a
teacher made from it by RL sharpens its own preferred one (the verifiers,
`mopd.rewards.open_answers`, accept them all):

- `carry` (`47+38=`): the bare sum `85`, or a worked solution column by column from the
  units with the carry written always (`7+8=15 4+3+1=8 85`) or only when it is 1
  (`7+2=9 4+3=7 79`), a third each;
- `spread` (`spread abbac=`: 4-7 letters of a-f, at least two equal ones side by side, no
  letter more than half of them): a uniformly drawn arrangement with no two equal neighbours;
- `mix` (`mix abc xyz=`, two words of 2-5 letters): a uniformly drawn interleaving that
  keeps each word's letter order (`axbycz`, `abxcyz`, `abcxyz`, ...).
"""

from __future__ import annotations

import itertools
import random
import string

SPREAD_LETTERS = "abcdef"


def carry(rng: random.Random) -> tuple[str, str]:
    """`a+b=` (a, b in 0-99) and the sum, bare or worked out with its carries."""
    a, b = rng.randrange(100), rng.randrange(100)
    style = rng.randrange(3)
    if style == 0:
        return f"{a}+{b}=", str(a + b)
    units = a % 10 + b % 10
    c = units // 10
    tens = f"{a // 10}+{b // 10}+{c}" if style == 1 or c else f"{a // 10}+{b // 10}"
    return f"{a}+{b}=", f"{a % 10}+{b % 10}={units} {tens}={a // 10 + b // 10 + c} {a + b}"


def spread(rng: random.Random) -> tuple[str, str]:
    """`spread <letters>=` with equal neighbours, and an arrangement without any."""
    n = rng.randint(4, 7)
    while True:
        letters = rng.choices(SPREAD_LETTERS, k=n)
        if max(map(letters.count, letters)) > n // 2:
            continue
        if not _no_equal_neighbours(letters):
            break
    answer = letters[:]
    while not _no_equal_neighbours(answer):
        rng.shuffle(answer)
    return f"spread {''.join(letters)}=", "".join(answer)


def mix(rng: random.Random) -> tuple[str, str]:
    """`mix <w1> <w2>=` and a random interleaving of the two words."""
    first, second = (
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 5))) for _ in range(2)
    )
    slots = sorted(rng.sample(range(len(first) + len(second)), len(first)))
    rest, own = iter(second), iter(first)
    answer = "".join(next(own) if i in slots else next(rest) for i in range(len(first + second)))
    return f"mix {first} {second}=", answer


def _no_equal_neighbours(letters) -> bool:
    return all(x != y for x, y in itertools.pairwise(letters))
