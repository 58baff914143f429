"""Outcome rewards (verifiers) per domain: exact, numeric and Python test execution."""

from mopd_megatron.mopd.rewards.code import extract_code, python_tests, run_python
from mopd_megatron.mopd.rewards.match import exact_match, numeric_match, parse_number
from mopd_megatron.mopd.rewards.registry import (
    get_verifier,
    register_domain,
    register_verifier,
    score,
    score_batch,
    verifier_names,
)

__all__ = [
    "exact_match",
    "extract_code",
    "get_verifier",
    "numeric_match",
    "parse_number",
    "python_tests",
    "register_domain",
    "register_verifier",
    "run_python",
    "score",
    "score_batch",
    "verifier_names",
]
