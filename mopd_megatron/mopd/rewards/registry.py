"""Outcome rewards: (prompt record, response text) -> verifier score in [0, 1].

A verifier is a function `(record, response_text) -> float`. The one used for a record is,
in order: the verifier named by `record.verifier`; the verifier that `register_domain`
mapped the record's domain to; a verifier whose name is the domain itself. Built in:
`exact`, `numeric` (alias of domain `math`), `python` (alias `code`, and of domain
`code`) and the open-answer verifiers `worked_sum`, `spread`, `interleaving`. The
response text is the decoded response without special tokens.

Verifiers that run model-written code (`python`, and any registered with `runs_code=True`)
run it in `envs.sandbox`; `check_code_sandbox` refuses, before training starts, records that
need them where the sandbox is unavailable, unless the recipe accepts weak mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from mopd_megatron.envs import sandbox
from mopd_megatron.mopd.rewards.code import python_tests
from mopd_megatron.mopd.rewards.match import exact_match, numeric_match
from mopd_megatron.mopd.rewards.open_answers import interleaving, spread, worked_sum

Verifier = Callable[[object, str], float]

_VERIFIERS: dict[str, Verifier] = {}
_DOMAINS: dict[str, str] = {}
_RUNS_CODE: set[str] = set()


def register_verifier(name: str, fn: Verifier, runs_code: bool = False) -> None:
    """Make `fn` available under `name` (for `record.verifier` or a domain of that name);
    `runs_code`: it runs model-written code (in `envs.sandbox`)."""
    _VERIFIERS[name] = fn
    if runs_code:
        _RUNS_CODE.add(name)
    else:
        _RUNS_CODE.discard(name)


def register_domain(domain: str, verifier: str) -> None:
    """Score records of `domain` with the verifier named `verifier` by default."""
    if verifier not in _VERIFIERS:
        raise KeyError(f"unknown verifier {verifier!r}; registered: {sorted(_VERIFIERS)}")
    _DOMAINS[domain] = verifier


def get_verifier(record) -> Verifier:
    """The verifier for `record` (see the module docstring for the lookup order)."""
    name = _verifier_name(record)
    if name not in _VERIFIERS:
        raise KeyError(
            f"{record.id}: no verifier for domain {record.domain!r} (verifier {name!r}); "
            f"set the record's 'verifier' to one of {sorted(_VERIFIERS)} or register one"
        )
    return _VERIFIERS[name]


def check_code_sandbox(records: Sequence, allow_weak_sandbox: bool = False) -> None:
    """Before training: when a record's verifier runs code, check it can (`sandbox.require`).

    Raises:
        sandbox.SandboxUnavailable: code must run, the sandbox cannot, and weak mode is not
            allowed.
    """
    if any(_verifier_name(r) in _RUNS_CODE for r in records):
        sandbox.require(allow_weak_sandbox)


def _verifier_name(record) -> str:
    return record.verifier or _DOMAINS.get(record.domain, record.domain)


def score(record, response_text: str) -> float:
    """The verifier's score of one response, clipped to [0, 1].

    Args:
        record: a `data.PromptRecord` (domain, answer, tests, verifier, metadata).
        response_text: the response decoded without special tokens.

    Returns:
        The reward in [0, 1].
    """
    return min(1.0, max(0.0, float(get_verifier(record)(record, response_text))))


def score_batch(
    records: Sequence, responses: Sequence[str], max_workers: int | None = 8
) -> list[float]:
    """`score` for every (record, response) pair; code runs overlap in a thread pool."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    if max_workers is None or max_workers <= 1:
        return [score(r, t) for r, t in zip(records, responses)]
    with ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(score, records, responses))


def verifier_names() -> list[str]:
    """The registered verifier names."""
    return sorted(_VERIFIERS)


register_verifier("exact", exact_match)
register_verifier("numeric", numeric_match)
register_verifier("python", python_tests, runs_code=True)
register_verifier("code", python_tests, runs_code=True)
register_verifier("worked_sum", worked_sum)
register_verifier("interleaving", interleaving)
register_verifier("spread", spread)
register_domain("math", "numeric")
