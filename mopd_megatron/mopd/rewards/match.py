"""Verifiers that compare a response with the record's `answer`: exact and numeric.

Both take the response text as decoded without special tokens and return 1.0 or 0.0.

- `exact`: the stripped response equals the stripped answer (string transforms, short
  answers such as the toy world's `85`, `zkxwq`, `kqwxz`).
- `numeric`: the last number of the response (or the content of its last `\\boxed{...}`)
  equals the answer as a number (integers, decimals, `a/b` fractions, `1,000` separators),
  up to a relative tolerance of 1e-6.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def exact_match(record, response: str) -> float:
    """1.0 when the stripped response equals the record's answer, else 0.0."""
    return float(response.strip() == _answer_of(record).strip())


def numeric_match(record, response: str, rel_tol: float = 1e-6) -> float:
    """1.0 when the response's final number equals the record's numeric answer, else 0.0."""
    expected = parse_number(_answer_of(record))
    if expected is None:
        raise ValueError(f"{record.id}: answer {record.answer!r} is not a number")
    boxed = _BOXED.findall(response)
    found = _NUMBER.findall(boxed[-1] if boxed else response)
    got = parse_number(found[-1]) if found else None
    if got is None:
        return 0.0
    return float(math.isclose(got, expected, rel_tol=rel_tol, abs_tol=1e-9))


def parse_number(text: str) -> float | None:
    """`'1,234'`, `'-3.5'`, `'3/4'` -> float; None when the text is not one number."""
    text = text.strip().replace(",", "")
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        return None


def _answer_of(record) -> str:
    if record.answer is None:
        raise ValueError(f"{record.id}: domain {record.domain!r} needs an 'answer' to verify")
    return record.answer
