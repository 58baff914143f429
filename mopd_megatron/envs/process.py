"""Run one command and collect what it prints, never waiting past a deadline.

The caller's safety does not depend on the command behaving: stdout and stderr are read as
they come, at most `max_output` bytes of each are kept (a command that prints more is stopped
there), the deadline covers the whole run (a process that keeps a pipe open or never exits is
killed when it passes), and the command's process group is killed whenever the caller stops
reading. Inside the sandbox the command is bubblewrap, whose death ends every process of the
sandbox; outside it (weak mode) only the process group can be reached.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

EXIT_GRACE_S = 0.5
"""How long output is still read after the command exits (a child left behind that holds the
pipes open is not waited for)."""
CHUNK = 1 << 16


@dataclass(frozen=True)
class Result:
    """What a sandboxed run produced."""

    returncode: int
    """Exit status; 128 + N when the sandbox reports its command killed by signal N (e.g. 152
    for the CPU-time limit), -9 when the caller killed it (time-out or too much output)."""
    stdout: str
    """At most `Limits.output_bytes` of standard output (UTF-8, bad bytes replaced)."""
    stderr: str
    timed_out: bool
    """The wall-clock limit passed and the run was killed."""
    truncated: bool
    """The command printed more than the output limit and was stopped there."""

    @property
    def ok(self) -> bool:
        """Exited with status 0, in time, within the output limit."""
        return self.returncode == 0 and not self.timed_out and not self.truncated


def run_bounded(
    argv: Sequence[str],
    *,
    stdin: int,
    timeout_s: float,
    max_output: int,
    pass_fds: Sequence[int] = (),
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> Result:
    """Run `argv` in its own session; see the module docstring for the guarantees.

    Args:
        argv: the command.
        stdin: a file descriptor for its standard input (a file, so no write can block).
        timeout_s: wall-clock limit for the whole run.
        max_output: bytes of stdout and of stderr kept; more stops the run.
        pass_fds: descriptors the command inherits.
        cwd: its working folder.
        env: its environment.
    """
    proc = subprocess.Popen(
        list(argv), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        pass_fds=tuple(pass_fds), cwd=cwd, env=env, start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    timed_out = truncated = False
    try:
        with selectors.DefaultSelector() as selector:
            for fd in buffers:
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ)
            while selector.get_map() and not truncated:
                if _exited(proc):
                    deadline = min(deadline, time.monotonic() + EXIT_GRACE_S)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(min(remaining, 0.1)):
                    data = os.read(key.fd, CHUNK)
                    if not data:
                        selector.unregister(key.fd)
                    room = max_output - len(buffers[key.fd])
                    buffers[key.fd] += data[:room]
                    truncated = truncated or len(data) > room
        while not truncated and not _exited(proc) and time.monotonic() < deadline:
            time.sleep(0.01)
        timed_out = not truncated and not _exited(proc)
    finally:
        _kill_group(proc)
        proc.stdout.close()
        proc.stderr.close()
    out, err = (bytes(b).decode("utf-8", "replace") for b in buffers.values())
    code = -signal.SIGKILL if timed_out or truncated else proc.returncode
    return Result(code, out, err, timed_out, truncated)


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the command has exited, without reaping it: until `_kill_group` reaps it, its
    pid, and so its process group's id, cannot be reused by another process."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group (the command leads it), then reap the command."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
