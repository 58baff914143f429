"""Launch stage, SLURM: the sbatch script of a job, and its submission.

Consumes the recipe, its plan's `Placement` and the command line to forward; produces the
script `tools/launch/mopd.sbatch.template` describes, with the `{{FIELD}}`s filled in:

- one allocation of all the job's nodes, whose host list (`scontrol show hostnames`) is
  split in order into the node groups, or with `launch.slurm.hetjob` (and more than one
  group) one heterogeneous-job component per non-empty group (student, rollout, teachers),
  whose host lists are joined;
- `srun` with one task per node, each running `python -m mopd_megatron.launch RECIPE
  --hosts <all hosts>`, which starts that node's share (see `launch.runner`).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from mopd_megatron.config import Recipe
from mopd_megatron.launch.commands import launch_dir
from mopd_megatron.plan.placement import Placement

TEMPLATE = Path(__file__).resolve().parents[2] / "tools" / "launch" / "mopd.sbatch.template"
"""The script's template, in the repository checkout (the launcher runs from one)."""


def render_sbatch(recipe: Recipe, placement: Placement, forward: list[str]) -> str:
    """The job's sbatch script (see the module docstring).

    Args:
        recipe: the loaded recipe (`launch` and `logging.dir` are read).
        placement: the plan's node groups.
        forward: arguments for `python -m mopd_megatron.launch` on every node (the recipe
            path, its overrides, --model-config ...).

    Returns:
        The script's text.
    """
    if not TEMPLATE.is_file():
        raise FileNotFoundError(f"{TEMPLATE}: the sbatch template is missing (run from a "
                                "checkout of the repository)")
    slurm = recipe.launch.slurm
    folder = launch_dir(recipe)
    groups = {name: nodes for name, nodes in placement.group_nodes.items() if nodes}
    common = [f"--job-name={slurm.job_name}", f"--time={slurm.time}",
              f"--output={folder}/slurm-%j.out", f"--chdir={Path.cwd()}"]
    per_group = [f"--{flag}={value}" for flag, value in (
        ("partition", slurm.partition), ("account", slurm.account), ("qos", slurm.qos)) if value]
    per_group += ["--ntasks-per-node=1", f"--gpus-per-node={placement.gpus_per_node}",
                  *(["--exclusive"] if slurm.exclusive else []), *slurm.sbatch_args]
    srun = ["--ntasks-per-node=1", f"--gpus-per-node={placement.gpus_per_node}",
            "--kill-on-bad-exit=1", *slurm.srun_args]
    if slurm.hetjob and len(groups) > 1:
        lines = []
        for index, nodes in enumerate(groups.values()):
            if index:
                lines.append("#SBATCH hetjob")
            options = (common if index == 0 else []) + [f"--nodes={nodes}", *per_group]
            lines += [f"#SBATCH {option}" for option in options]
        hosts = ("MOPD_HOSTS=$(for group in " + " ".join(str(i) for i in range(len(groups)))
                 + '; do nodes=SLURM_JOB_NODELIST_HET_GROUP_$group; '
                 + 'scontrol show hostnames "${!nodes}"; done | paste -sd, -)')
        srun.insert(0, "--het-group=" + ",".join(str(i) for i in range(len(groups))))
    else:
        lines = [f"#SBATCH {option}"
                 for option in common + [f"--nodes={placement.nodes}", *per_group]]
        hosts = 'MOPD_HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)'
    fields = {
        "GROUPS": ", ".join(f"{name} {nodes} node(s)" for name, nodes in groups.items()),
        "SBATCH": "\n".join(lines),
        "SETUP": "\n".join(recipe.launch.setup),
        "HOSTS": hosts,
        "LAUNCH_DIR": shlex.quote(str(folder)),
        "SRUN": " ".join(shlex.quote(arg) for arg in srun),
        "PYTHON": shlex.quote(sys.executable),
        "RECIPE": shlex.join(forward),
    }
    return re.sub(r"\{\{(\w+)\}\}", lambda match: fields[match.group(1)], TEMPLATE.read_text())


def submit(script: str, path: Path) -> str:
    """Write the script to `path`, submit it with `sbatch`, and return sbatch's answer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"sbatch {path} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()
