"""Run a test script on several ranks with torchrun over gloo and collect what each rank reports.

A script calls `report(args.out, rank, obj)`; `run_torchrun` returns the objects by rank.
Each launch costs ~5 s of process start, so group the cases of one layout per launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPTS = Path(__file__).parent / "dist_scripts"


def run_torchrun(script: str, nproc: int, *args: str, timeout: int = 300) -> list[dict]:
    """Launch tests/dist_scripts/`script` on `nproc` ranks; return each rank's report."""
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", str(SCRIPTS / script), "--out", out, *args,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(
                f"{script} on {nproc} ranks failed (rc={proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
            )
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)]


def report(out: str, rank: int, obj: dict) -> None:
    """Write one rank's results for `run_torchrun` to collect."""
    Path(out, f"rank{rank}.json").write_text(json.dumps(obj))
