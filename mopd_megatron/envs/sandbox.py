"""Run model-written code in a sandbox: the code verifier's programs now, agent tools next.

    result = run([PYTHON, "-I", "main.py"], files={"main.py": source}, stdin="1 2\\n",
                 limits=Limits(timeout_s=5))
    result.ok, result.stdout, result.timed_out, result.truncated

Every run gets a new sandbox (`envs.bwrap`: its own PID, network, mount and IPC namespaces,
an unprivileged uid, a throwaway /tmp as its working folder and only writable place, limits
on processes, CPU time, memory, file and folder size, and all its processes killed at the
end). The caller keeps at most `Limits.output_bytes` of each stream and never waits past
`Limits.timeout_s` (`envs.process`).

Where bubblewrap cannot run (not installed, user namespaces disabled, a container without
the privileges), `run` refuses with `SandboxUnavailable` unless weak mode was accepted
(`require(allow_weak=True)`, from a recipe's `data.allow_weak_sandbox`). Weak mode keeps
the time, output, CPU, memory and file-size limits and runs in a temporary folder, but the
code runs as the caller's user with no namespaces: it can read what the caller can read,
reach the network, run any number of processes, and a child that starts its own session
outlives the run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mopd_megatron.envs.bwrap import PYTHON, SANDBOX_UID, bwrap_argv, prlimit_argv
from mopd_megatron.envs.process import Result, run_bounded

__all__ = ["PYTHON", "Limits", "Result", "SandboxUnavailable", "require", "run",
           "unavailable_reason"]

log = logging.getLogger(__name__)
_weak_mode = False
"""Set by `require(allow_weak=True)` where the sandbox is unavailable."""


@dataclass(frozen=True)
class Limits:
    """What one run may use. Memory, CPU and file size are per process."""

    timeout_s: float = 10.0
    """Wall-clock limit of the whole run; everything it started is killed past it. Each
    process also gets timeout_s + 1 seconds of CPU time (rounded up)."""
    memory_bytes: int = 2 << 30
    """Address space of each process."""
    processes: int = 32
    """Processes and threads of the sandbox's user at once (under a root trainer, every
    sandbox's uid 65534 shares this count)."""
    file_bytes: int = 16 << 20
    """Largest file a process may write."""
    folder_bytes: int = 64 << 20
    """Size of the writable working folder (a tmpfs: it counts as memory while the run lasts)."""
    open_files: int = 256
    """Open file descriptors per process."""
    output_bytes: int = 1 << 20
    """Bytes of stdout and of stderr kept; a run that prints more is stopped (`truncated`)."""

    @property
    def cpu_s(self) -> int:
        return math.ceil(self.timeout_s) + 1


class SandboxUnavailable(RuntimeError):
    """Code was to run where the sandbox cannot, and weak mode was not accepted."""


def run(
    command: Sequence[str],
    *,
    files: dict[str, str | bytes] | None = None,
    stdin: str | bytes = "",
    limits: Limits = Limits(),
) -> Result:
    """Run `command` in a fresh sandbox, its working folder holding `files`.

    Args:
        command: the program and its arguments, e.g. `[PYTHON, "-I", "main.py"]`.
        files: relative path -> content, written into the working folder first.
        stdin: the command's standard input.
        limits: resource limits of the run.

    Raises:
        SandboxUnavailable: no sandbox here and weak mode not accepted.
    """
    files = files or {}
    for name in files:
        path = PurePosixPath(name)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ValueError(f"sandbox file {name!r}: must be a relative path in the folder")
    reason = unavailable_reason()
    if reason is None:
        return _sandboxed(command, files, stdin, limits)
    if not _weak_mode:
        raise SandboxUnavailable(_refusal(reason))
    return _weak(command, files, stdin, limits)


def require(allow_weak: bool) -> None:
    """Check, before any code runs, that it can run: in the sandbox, or in weak mode when
    `allow_weak` (which then warns, naming what is missing)."""
    global _weak_mode
    reason = unavailable_reason()
    if reason is None:
        return
    if not allow_weak:
        raise SandboxUnavailable(_refusal(reason))
    if _weak_mode:
        return
    _weak_mode = True
    log.warning(
        "running model-written code in WEAK MODE, without a sandbox: %s. It runs as this "
        "user with time, output, CPU, memory and file-size limits only: it can read this "
        "user's files, reach the network, start any number of processes, and a child in a "
        "session of its own outlives its run.", reason,
    )


@functools.cache
def unavailable_reason() -> str | None:
    """None where the sandbox works on this machine, else what is missing (one line)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    probe = [PYTHON, "-I", "-c", "import os; print(os.getuid())"]
    try:
        result = _sandboxed(probe, {}, "", Limits(timeout_s=30))
    except OSError as err:
        return f"bwrap cannot start: {err}"
    if result.returncode != 0 or result.stdout.strip() != str(SANDBOX_UID):
        lines = result.stderr.strip().splitlines() or [f"exit status {result.returncode}"]
        return f"bwrap cannot start the sandbox here: {lines[-1]}"
    return None


def _refusal(reason: str) -> str:
    return (f"cannot run model-written code in a sandbox: {reason.rstrip('.')}. Fix that, or "
            "accept the weaker isolation with the recipe key data.allow_weak_sandbox: true "
            "(README, 'The code sandbox')")


def _sandboxed(command, files, stdin, limits: Limits) -> Result:
    with contextlib.ExitStack() as stack:
        fds = {name: stack.enter_context(_memfd(content)) for name, content in files.items()}
        stdin_fd = stack.enter_context(_memfd(stdin))
        return run_bounded(
            bwrap_argv(command, limits, fds), stdin=stdin_fd, pass_fds=list(fds.values()),
            timeout_s=limits.timeout_s, max_output=limits.output_bytes, cwd="/",
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )


def _weak(command, files, stdin, limits: Limits) -> Result:
    with tempfile.TemporaryDirectory(prefix="mopd_weak_sandbox_",
                                     ignore_cleanup_errors=True) as folder, \
            _memfd(stdin) as stdin_fd:
        for name, content in files.items():
            path = Path(folder, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_bytes(content))
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": folder, "TMPDIR": folder,
               "LANG": "C.UTF-8"}
        return run_bounded(
            prlimit_argv(limits, processes=False) + list(command), stdin=stdin_fd,
            timeout_s=limits.timeout_s, max_output=limits.output_bytes, cwd=folder, env=env,
        )


@contextlib.contextmanager
def _memfd(content: str | bytes) -> Iterator[int]:
    """A descriptor reading `content` from its start (an in-memory file: never blocks)."""
    fd = os.memfd_create("mopd_sandbox")
    try:
        view = memoryview(_bytes(content))
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _bytes(content: str | bytes) -> bytes:
    return content.encode() if isinstance(content, str) else content
