"""Launch stage: run one node's share of a job and stop it when the student is done.

Consumes the job's `JobCommands` and this node's index; produces running processes and an exit
status. Each process starts in its own session with its output in its log file. A node with
student ranks waits for its torchrun; when that ends, its first node writes the end marker
(<launch dir>/done, holding the exit status) and every node stops its servers. A node with
servers only watches: it stops them and exits when a marker newer than its own start appears,
and exits with status 1 (ending the whole SLURM step) when one of its servers dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from mopd_megatron.launch.commands import JobCommands, Process, write_resolved_recipe

POLL_S = 5.0
GRACE_S = 30.0


def run_node(commands: JobCommands, node: int) -> int:
    """Start node `node`'s processes, wait as the module docstring says, and stop them.

    Args:
        commands: the whole job's commands.
        node: this node's index in `commands.hosts`.

    Returns:
        The exit status: the student's on student nodes, else 0 (or 1 if a server died).
    """
    started = time.time()
    marker = commands.launch_dir / "done"
    commands.launch_dir.mkdir(parents=True, exist_ok=True)
    is_student = node in commands.student_nodes
    if is_student:
        write_resolved_recipe(commands)
    running = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for process in commands.nodes[node]:
            running.append((process, _start(process)))
            print(f"{commands.hosts[node]}: started {process.name}, log {process.log}",
                  flush=True)
        if is_student:
            student = next(proc for process, proc in running if process.name == "student")
            status = student.wait()
            if node == commands.student_nodes[0]:
                marker.write_text(f"{status}\n")
            return status
        while True:
            for process, proc in running:
                if proc.poll() is not None:
                    print(f"{process.name} on {commands.hosts[node]} exited with "
                          f"{proc.returncode}; log {process.log}", flush=True)
                    return 1
            if marker.is_file() and marker.stat().st_mtime >= int(started):
                return 0
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        return 130
    finally:
        for _, proc in running:
            _stop(proc)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    """SIGTERM (scancel, the end of the allocation): stop this node's processes."""
    raise KeyboardInterrupt


def _start(process: Process) -> subprocess.Popen:
    Path(process.log).parent.mkdir(parents=True, exist_ok=True)
    with open(process.log, "ab") as log:
        log.write(f"$ {process.shell()}\n".encode())
        log.flush()
        return subprocess.Popen(process.argv, env={**os.environ, **process.env}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process's session, then SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
