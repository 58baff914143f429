"""Launching the stack's own commands as child processes, with their output kept in a log.

Baselines that chain runs (Cascade RL's stages, the table's methods) start each one as
`python -m <module> ...` (e.g. `mopd_megatron.cli train RECIPE key=value ...`), so every run
goes through the same entry point a person would type, torchrun relaunch included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LOG_TAIL_LINES = 25
"""Lines of a failed run's log quoted in the error."""


def run_module(args: list[str], log: str | Path) -> None:
    """Run `python -m ARGS` with its output in `log`.

    Args:
        args: the module and its arguments.
        log: the log file (its folder is created).

    Raises:
        RuntimeError: the command failed; the message quotes the end of its log.
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log, "w") as f:
        code = subprocess.call(
            [sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT, env=env
        )
    if code:
        tail = "\n".join(log.read_text().splitlines()[-LOG_TAIL_LINES:])
        raise RuntimeError(f"python -m {' '.join(args[:2])} failed ({code}); {log}:\n{tail}")
