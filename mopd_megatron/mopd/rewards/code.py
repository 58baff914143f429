"""Verifier that runs a Python response against the record's tests in a subprocess.

The program is the response's last fenced code block (```python ... ``` or ``` ... ```), or
the whole response when it has none. `record.tests` is either:

- test code (a string, or a list of strings such as `assert f(2) == 4`), run after the
  program in the same file: the response passes when the file runs to its end (a random
  token printed last, so an early `sys.exit(0)` fails) and exits with status 0;
- stdin/stdout cases (a list of `{"input": str, "output": str}`): the program runs once
  per case and passes when every output matches (trailing spaces and blank lines ignored).

The score is 1.0 when everything passes and 0.0 otherwise: a failed test, a crash, a
time-out (`record.metadata["timeout_s"]`, default 10 s per run) or memory over the limit
all give 0. Each run has its own temporary folder, isolated mode (`python -I`), an empty
environment and its own process group, killed whole on time-out.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import tempfile

DEFAULT_TIMEOUT_S = 10.0
MEMORY_LIMIT_BYTES = 2 << 30

# Sets the memory limit inside the child (a preexec_fn is unsafe beside threads), then runs
# main.py as __main__.
_LAUNCHER = f"""
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT_BYTES}, {MEMORY_LIMIT_BYTES}))
except (ImportError, ValueError, OSError):
    pass
import runpy, sys
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""
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
    returncode, stdout = run_python(source, timeout_s=timeout_s)
    return float(returncode == 0 and stdout.rstrip().endswith(token))


def extract_code(response: str) -> str:
    """The last fenced code block of a response, or the whole response without fences."""
    blocks = _FENCE.findall(response)
    return blocks[-1] if blocks else response


def run_python(
    source: str, stdin: str = "", timeout_s: float = DEFAULT_TIMEOUT_S
) -> tuple[int, str]:
    """Run `source` in a fresh sandboxed interpreter.

    Args:
        source: the Python file's text.
        stdin: text fed to the program's standard input.
        timeout_s: wall-clock limit; the whole process group is killed past it.

    Returns:
        (exit status, standard output); the status is -9 on time-out.
    """
    with tempfile.TemporaryDirectory(prefix="mopd_verify_") as workdir:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(source)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _LAUNCHER],
            cwd=workdir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            start_new_session=True,
            text=True,
        )
        try:
            stdout, _ = proc.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return -9, ""
        return proc.returncode, stdout


def _passes_io_case(program: str, case: dict, timeout_s: float, where: str) -> bool:
    if not isinstance(case.get("input", ""), str) or not isinstance(case.get("output"), str):
        raise TypeError(f"{where}: a test case needs string 'input' and 'output', got {case!r}")
    returncode, stdout = run_python(program, stdin=case.get("input", ""), timeout_s=timeout_s)
    return returncode == 0 and _normalise(stdout) == _normalise(case["output"])


def _normalise(text: str | None) -> list[str]:
    lines = [line.rstrip() for line in (text or "").strip().splitlines()]
    return [line for line in lines if line]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.communicate()
