"""`mopd-megatron launch RECIPE`: start a recipe's whole job (student, rollout, teachers).

    mopd-megatron launch RECIPE [key.sub=value ...] [--model-config DIR]
        [--slurm | --hosts H0,H1,... [--node-rank N]] [--dry-run]

The recipe is planned first (`mopd-megatron plan`); a plan with problems stops here, with
status 1. Then:

- no option: the job fits on this node; run it here (servers on their GPUs, then torchrun).
- `--hosts`: a job over several nodes started by hand or by another scheduler; run it as
  the same command on every host, each starting its own share (`launch.runner`).
- `--slurm`: write <logging.dir>/launch/mopd.sbatch (see `launch.slurm`) and submit it; its
  srun starts the `--hosts` form on every node of the allocation.

`--dry-run` prints instead what would run: the sbatch script, and every node's exact commands
(with `node-0`, `node-1`, ... standing for the allocation's hosts unless --hosts is given) and
the engine URLs of the recipe the student trains with.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from mopd_megatron.config import RecipeError, load_recipe
from mopd_megatron.hf.spec import HFConfigError
from mopd_megatron.plan.cli import add_arguments
from mopd_megatron.plan.params import PlanError


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `launch`'s arguments to `parser` and make `main` its command."""
    add_arguments(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--slurm", action="store_true", help="submit the job with sbatch")
    where.add_argument("--hosts", help="comma-separated hosts of a multi-node job, in order")
    parser.add_argument("--node-rank", type=int,
                        help="this host's index in --hosts (default: found by host name)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the script and every node's commands; start nothing")
    parser.set_defaults(func=main)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `launch` on the CLI's subparsers; the command runs `main(args)`."""
    return configure(subparsers.add_parser(
        "launch", help="start a recipe's job here, over --hosts, or on SLURM"
    ))


def main(args: argparse.Namespace) -> int:
    """Run `launch` (see the module docstring); returns the exit status."""
    from mopd_megatron.plan.planner import make_plan
    from mopd_megatron.plan.report import format_plan

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        plan = make_plan(recipe, args.model_config)
    except (RecipeError, HFConfigError, PlanError) as err:
        print(f"mopd-megatron launch: error: {err}", file=sys.stderr)
        return 2
    if not plan.ok:
        print(format_plan(plan), file=sys.stderr)
        return 1
    forward = [args.recipe, *args.overrides]
    if args.model_config:
        forward += ["--model-config", args.model_config]
    try:
        return _launch(args, recipe, plan.placement, forward)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"mopd-megatron launch: error: {err}", file=sys.stderr)
        return 2


def _launch(args, recipe, placement, forward: list[str]) -> int:
    from mopd_megatron.launch.commands import job_commands, launch_dir
    from mopd_megatron.launch.runner import run_node
    from mopd_megatron.launch.slurm import render_sbatch, submit

    if args.slurm:
        script = render_sbatch(recipe, placement, forward)
        path = launch_dir(recipe) / "mopd.sbatch"
        if not args.dry_run:
            print(submit(script, path))
            return 0
        print(f"# {path} (submitted with `sbatch {path}`)\n{script}")
    if args.hosts:
        hosts = args.hosts.split(",")
    elif args.slurm or (args.dry_run and placement.nodes > 1):
        hosts = [f"node-{i}" for i in range(placement.nodes)]
    else:
        if placement.nodes > 1:
            raise ValueError(f"the job needs {placement.nodes} nodes: use --slurm or --hosts")
        hosts = [socket.gethostname()]
    commands = job_commands(recipe, placement, hosts)
    if args.dry_run:
        print(format_commands(commands, placement))
        return 0
    node = args.node_rank if args.node_rank is not None else this_node(hosts)
    return run_node(commands, node)


def this_node(hosts: list[str]) -> int:
    """This machine's index in `hosts`, by SLURM's node name or the host name."""
    hostname = socket.gethostname()
    names = [os.environ.get("SLURMD_NODENAME", ""), hostname, hostname.split(".")[0]]
    for name in names:
        if name in hosts:
            return hosts.index(name)
    raise ValueError(f"this machine ({', '.join(n for n in names if n)}) is not among the "
                     f"hosts {','.join(hosts)}; pass --node-rank")


def format_commands(commands, placement) -> str:
    """Every node's processes as shell lines, and the engines the student attaches to."""
    groups = []
    for group, count in placement.group_nodes.items():
        groups += [group] * count
    lines = [(f"# {len(commands.hosts)} node(s); each runs `python -m mopd_megatron.launch "
              f"... --hosts {','.join(commands.hosts)}`, which starts:")]
    for node, processes in enumerate(commands.nodes):
        lines.append(f"[node {node}: {commands.hosts[node]}, {groups[node]} group]")
        for process in processes:
            lines += [f"  {process.name}:  {process.shell()}", f"    > {process.log}"]
    resolved = commands.resolved
    lines.append(f"# the student trains with {commands.recipe_path}: the recipe, with")
    lines.append(f"  rollout: engine {resolved['rollout']['engine']} {resolved['rollout']['url']}")
    for teacher in resolved["teachers"]["teachers"]:
        lines.append(f"  teacher {teacher['name']}: engine {teacher['engine']} {teacher['url']}")
    return "\n".join(lines)
