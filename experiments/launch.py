"""Running `mopd-megatron train` on a recipe as a child process, with its output in a log.

Experiments that chain runs (Cascade RL's stages, the table's methods) save each run's recipe
and start `python -m mopd_megatron.cli train RECIPE`, so every run goes through the same entry
point a person would type, torchrun relaunch included.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mopd_megatron.config import Recipe, save_recipe

LOG_TAIL_LINES = 25
"""Lines of a failed run's log quoted in the error."""


def run_train(recipe: Recipe, name: Path) -> None:
    """`mopd-megatron train` on `recipe`, saved as `<name>.yaml`, output in `<name>.log`.

    Raises:
        RuntimeError: the run failed; the message quotes the end of its log.
    """
    path = save_recipe(recipe, name.with_suffix(".yaml"))
    log = name.with_suffix(".log")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log, "w") as f:
        code = subprocess.call([sys.executable, "-m", "mopd_megatron.cli", "train", str(path)],
                               stdout=f, stderr=subprocess.STDOUT, env=env)
    if code:
        tail = "\n".join(log.read_text().splitlines()[-LOG_TAIL_LINES:])
        raise RuntimeError(f"mopd-megatron train {path} failed ({code}); {log}:\n{tail}")
