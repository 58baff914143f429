"""Outcome rewards: exact, numeric and sandboxed code verifiers, and the registry.

The hostile code samples are in test_sandbox.py; here the code runs in the sandbox, or in weak
mode where this machine has none.
"""

import time

import pytest

from mopd_megatron.data import PromptRecord
from mopd_megatron.envs import sandbox
from mopd_megatron.mopd.rewards import (
    get_verifier,
    parse_number,
    register_domain,
    register_verifier,
    score,
    score_batch,
)
from mopd_megatron.mopd.rewards.registry import check_code_sandbox


def rec(domain="x", **kw):
    return PromptRecord(domain=domain, prompt="p", id="t", **kw)


def test_exact_strips_whitespace_only():
    record = rec("rev", answer="zkxwq", verifier="exact")
    assert score(record, " zkxwq\n") == 1.0
    assert score(record, "zkxw") == 0.0 and score(record, "ZKXWQ") == 0.0


def test_numeric_extracts_last_number_or_boxed():
    record = rec("math", answer="1,000")
    assert score(record, "so the answer is 1000") == 1.0
    assert score(record, "999 then \\boxed{1000.0} wait 3") == 1.0
    assert score(record, "12 apples and 7") == 0.0 and score(record, "no idea") == 0.0
    assert score(rec("math", answer="3/4"), "0.75") == 1.0
    assert parse_number("-2.5") == -2.5 and parse_number("x") is None
    with pytest.raises(ValueError, match="not a number"):
        score(rec("math", answer="abc"), "1")


def test_registry_lookup_order_and_errors():
    register_verifier("always_half", lambda record, text: 0.5)
    register_domain("essay", "always_half")
    assert score(rec("essay"), "...") == 0.5
    assert get_verifier(rec("essay", answer="a", verifier="exact"))(rec(answer="a"), "a") == 1.0
    register_verifier("too_big", lambda record, text: 7.0)
    assert score(rec("too_big"), "") == 1.0  # clipped to [0, 1]
    with pytest.raises(KeyError, match="no verifier for domain 'geo'"):
        score(rec("geo"), "x")
    with pytest.raises(KeyError, match="unknown verifier"):
        register_domain("geo", "nope")
    with pytest.raises(ValueError, match="needs an 'answer'"):
        score(rec("rev", verifier="exact"), "x")


SQUARE = "```python\ndef f(x):\n    return x * x\n```"


@pytest.fixture
def code_runs(monkeypatch):
    """Benign code runs here: in the sandbox, or in weak mode where there is none."""
    monkeypatch.setattr(sandbox, "_weak_mode", sandbox._weak_mode)
    sandbox.require(allow_weak=True)


def test_code_verifier_pass_fail_crash_timeout(code_runs):
    tests = ["assert f(2) == 4", "assert f(-3) == 9"]
    code = rec("code", tests=tests, metadata={"timeout_s": 2.0})
    assert score(code, "Here:\n" + SQUARE) == 1.0
    assert score(code, "def f(x):\n    return x + x\n") == 0.0  # wrong: f(-3) == -6
    assert score(code, "def f(x):\n    raise RuntimeError\n") == 0.0
    assert score(code, "this is not python") == 0.0
    assert score(code, "import sys\nsys.exit(0)\n") == 0.0  # exits before the tests
    start = time.perf_counter()
    assert score(code, "import time\ntime.sleep(30)\n") == 0.0
    assert time.perf_counter() - start < 10


def test_code_verifier_stdin_cases_and_batch(code_runs):
    cases = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4", "output": "6"}]
    record = rec("code", tests=cases)
    good = "a, b = map(int, input().split())\nprint(a + b)"
    bad = "a, b = map(int, input().split())\nprint(a - b)"
    assert score_batch([record, record], [good, bad], max_workers=2) == [1.0, 0.0]
    with pytest.raises(ValueError, match="needs 'tests'"):
        score(rec("code"), good)


def test_only_prompts_whose_verifier_runs_code_need_the_sandbox(monkeypatch):
    monkeypatch.setattr(sandbox, "unavailable_reason", lambda: "no bwrap (test)")
    monkeypatch.setattr(sandbox, "_weak_mode", False)
    check_code_sandbox([rec("math", answer="1"), rec("rev", verifier="exact")])
    for record in (rec("code", tests=["pass"]), rec("x", verifier="python")):
        with pytest.raises(sandbox.SandboxUnavailable, match="no bwrap"):
            check_code_sandbox([rec("math", answer="1"), record])
    check_code_sandbox([rec("code")], allow_weak_sandbox=True)
    assert score(rec("code", tests=["assert f(3) == 9"]), SQUARE) == 1.0
