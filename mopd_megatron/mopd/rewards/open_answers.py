"""Verifiers for prompts with many correct answers (the toy world's `open` domains).

Each reads the task from the record's prompt (`record.prompt`), not from a reference
answer, so every valid response scores 1.0, not only the one the data happened to hold.
Spaces around the answer are ignored.

- `worked_sum` (`47+38=`): the response's last space-separated field is the sum; every
  other field must be a true equation of digits and `+` (`7+8=15`, `4+3+1=8`), so a worked
  solution with carries, one without, or the bare sum all pass, and a false step fails.
- `spread` (`spread aabbc=`): any arrangement of the prompt's letters (spaces ignored) with
  no two equal letters side by side.
- `interleaving` (`mix abc xyz=`): any interleaving of the two words that keeps each word's
  letter order (`axbycz`, `abcxyz`, ...; spaces ignored).
"""

from __future__ import annotations

import itertools
import re

_NUMBER = re.compile(r"\d+")
_SUM = re.compile(r"(\d+)\+(\d+)=$")
_EQUATION = re.compile(r"(\d+(?:\+\d+)+)=(\d+)")


def worked_sum(record, response: str) -> float:
    """1.0 when the last field is the prompt's sum and every earlier field a true equation."""
    a, b = (int(x) for x in _task(record, _SUM).groups())
    fields = response.split()
    if not fields or not _NUMBER.fullmatch(fields[-1]) or int(fields[-1]) != a + b:
        return 0.0
    for step in fields[:-1]:
        match = _EQUATION.fullmatch(step)
        if not match or sum(map(int, match[1].split("+"))) != int(match[2]):
            return 0.0
    return 1.0


def spread(record, response: str) -> float:
    """1.0 for a rearrangement of the prompt's letters with no two equal neighbours."""
    letters = _task(record, re.compile(r"spread ([a-z]+)=$"))[1]
    text = response.replace(" ", "")
    if sorted(text) != sorted(letters):
        return 0.0
    return float(all(x != y for x, y in itertools.pairwise(text)))


def interleaving(record, response: str) -> float:
    """1.0 when the response interleaves the prompt's two words, each in its own order."""
    task = _task(record, re.compile(r"mix ([a-z]+) ([a-z]+)=$"))
    first, second, text = task[1], task[2], response.replace(" ", "")
    if len(text) != len(first) + len(second):
        return 0.0
    reachable = {(0, 0)}  # (letters of the first word used, letters of the second used)
    for ch in text:
        reachable = {(i + 1, j) for i, j in reachable if i < len(first) and first[i] == ch} | {
            (i, j + 1) for i, j in reachable if j < len(second) and second[j] == ch
        }
    return float(bool(reachable))


def _task(record, pattern: re.Pattern) -> re.Match:
    match = pattern.search(record.prompt or "")
    if match is None:
        raise ValueError(f"{record.id}: prompt {record.prompt!r} is not a {record.domain} task")
    return match
