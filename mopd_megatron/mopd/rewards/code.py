"""Verifier that runs a Python response against the record's tests in the sandbox.

The program is the response's last fenced code block (```python ... ``` or ``` ... ```), or
the whole response when it has none. `record.tests` is either:

- test code (a string, or a list of strings such as `assert f(2) == 4`), run after the
  program in the same file: the response passes when the file runs to its end (a random
  token printed last, so an early `sys.exit(0)` fails) and exits with status 0;
- stdin/stdout cases (a list of `{"input": str, "output": str}`): the program runs once
  per case and passes when every output matches (trailing spaces and blank lines ignored).

The score is 1.0 when everything passes and 0.0 otherwise: a failed test, a crash, a
time-out (`record.metadata["timeout_s"]`, default 10 s per run), more output than the sandbox
keeps, or any other limit passed all give 0. Every run is a fresh sandbox (`envs.sandbox`):
the program sees none of the trainer's files, processes or network, and all it started is
killed when the run ends.
"""

from __future__ import annotations

import re
import secrets

from mopd_megatron.envs import sandbox

DEFAULT_TIMEOUT_S = 10.0
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)


def python_tests(record, response: str) -> float:
    """1.0 when the response's program passes all of `record.tests`, else 0.0."""
    tests = record.tests
    if not tests:
        raise ValueError(f"{record.id}: domain {record.domain!r} needs 'tests' to verify code")
    program = extract_code(response)
    timeout_s = float(record.metadata.get("timeout_s", DEFAULT_TIMEOUT_S))
    if isinstance(tests, list) and all(isinstance(t, dict) for t in tests):
        return float(all(_passes_io_case(program, case, timeout_s, record.id) for case in tests))
    if isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        tests = "\n".join(tests)
    if not isinstance(tests, str):
        raise TypeError(f"{record.id}: 'tests' must be code or a list of input/output cases")
    # A program that exits early (sys.exit(0) before the tests run) never prints the token.
    token = secrets.token_hex(8)
    source = f"{program}\n\n{tests}\nprint({token!r})\n"
    result = run_python(source, timeout_s=timeout_s)
    return float(result.ok and result.stdout.rstrip().endswith(token))


def extract_code(response: str) -> str:
    """The last fenced code block of a response, or the whole response without fences."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def run_python(
    source: str, stdin: str = "", timeout_s: float = DEFAULT_TIMEOUT_S
) -> sandbox.Result:
    """Run `source` as main.py with this interpreter (isolated mode) in a fresh sandbox.

    Args:
        source: the Python file's text.
        stdin: text fed to the program's standard input.
        timeout_s: wall-clock limit; every process of the run is killed past it.
    """
    return sandbox.run([sandbox.PYTHON, "-I", "main.py"], files={"main.py": source},
                       stdin=stdin, limits=sandbox.Limits(timeout_s=timeout_s))


def _passes_io_case(program: str, case: dict, timeout_s: float, where: str) -> bool:
    if not isinstance(case.get("input", ""), str) or not isinstance(case.get("output"), str):
        raise TypeError(f"{where}: a test case needs string 'input' and 'output', got {case!r}")
    result = run_python(program, stdin=case.get("input", ""), timeout_s=timeout_s)
    return result.ok and _normalise(result.stdout) == _normalise(case["output"])


def _normalise(text: str | None) -> list[str]:
    lines = [line.rstrip() for line in (text or "").strip().splitlines()]
    return [line for line in lines if line]
