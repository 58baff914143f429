"""Running a command on this machine's ranks.

A command whose recipe needs several ranks re-runs itself under torchrun (gloo on CPU, NCCL on
GPU), unless torchrun (or SLURM's srun through tools/launch) already started it; so
`mopd-megatron train RECIPE` works the same for one rank or eight.
"""

from __future__ import annotations

import os
import subprocess
import sys


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_relaunch(nproc: int) -> bool:
    """True when `nproc` ranks are needed and this process is not one of them yet."""
    return nproc > 1 and not launched_by_torchrun()


def relaunch_under_torchrun(nproc: int, module: str, argv: list[str]) -> int:
    """Run `python -m MODULE ARGV` on `nproc` local ranks and return its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", module, *argv]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)
