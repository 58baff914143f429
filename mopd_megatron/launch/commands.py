"""Launch stage: the exact command of every process of a job, per node.

Consumes the recipe, its plan's `Placement` (node indices and GPUs) and the job's host names
in node order; produces a `JobCommands`: per node, the processes to start (argv, environment,
log file) and the resolved recipe that the student trains with.

- Student node i of n: `python -m torch.distributed.run --nnodes n --node-rank i
  --nproc-per-node g --master-addr <first student host> --master-port <ports.master>
  -m mopd_megatron.cli train <launch dir>/recipe.yaml` on its GPUs.
- SGLang server s: `rollout.sglang.launch_command` for its engine settings with --host 0.0.0.0,
  --port ports.engine + 100 s and --nccl-port ports.nccl + 100 s; a server spanning k nodes
  adds --nnodes k --node-rank r --dist-init-addr <its first host>:<ports.dist_init + 100 s>.
- The resolved recipe is the recipe (overrides applied, defaults written out) with every
  launched engine replaced by `engine: url` at http://<its first host>:<its port>, so the
  trainer attaches to the servers instead of starting them.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mopd_megatron.config import EngineConfig, Recipe, to_dict
from mopd_megatron.plan.placement import Placed, Placement
from mopd_megatron.plan.planner import sglang_servers
from mopd_megatron.rollout.sglang import launch_command

PORT_STRIDE = 100
"""Server i takes the ports base + 100 i: SGLang opens further ports above its base ones."""

STUDENT_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
"""Megatron's advice for overlapping tensor-parallel communication with compute."""


@dataclass(frozen=True)
class Process:
    """One process to start on a node."""

    name: str
    """'student' or 'server <name>'."""
    argv: list[str]
    env: dict[str, str]
    """Set on top of the node's environment."""
    log: str
    """File its stdout and stderr go to."""

    def shell(self) -> str:
        """The process as one shell line (`env K=V ... argv`)."""
        env = " ".join(f"{key}={shlex.quote(value)}" for key, value in self.env.items())
        return f"env {env} {shlex.join(self.argv)}" if env else shlex.join(self.argv)


@dataclass
class JobCommands:
    hosts: list[str]
    launch_dir: Path
    """See `launch_dir`."""
    resolved: dict
    """The recipe the student trains with (see the module docstring)."""
    nodes: list[list[Process]] = field(default_factory=list)
    """Processes per node, in node order (servers first, then the student)."""
    student_nodes: list[int] = field(default_factory=list)

    @property
    def recipe_path(self) -> Path:
        return self.launch_dir / "recipe.yaml"


def launch_dir(recipe: Recipe) -> Path:
    """<logging.dir>/launch: the sbatch script, resolved recipe, process logs, end marker."""
    return Path(recipe.logging.dir) / "launch"


def job_commands(recipe: Recipe, placement: Placement, hosts: list[str]) -> JobCommands:
    """Every node's processes (see the module docstring).

    Args:
        recipe: the loaded recipe (overrides applied).
        placement: the plan's node and GPU assignment.
        hosts: one host name per node of the placement, in node order.

    Returns:
        The commands, per node.
    """
    if len(hosts) != placement.nodes:
        raise ValueError(f"the job needs {placement.nodes} nodes, got {len(hosts)} hosts: "
                         f"{','.join(hosts)}")
    ports = recipe.launch.ports
    folder = launch_dir(recipe)
    resolved = to_dict(recipe)
    nodes: list[list[Process]] = [[] for _ in hosts]
    for index, (server, placed) in enumerate(
        zip(sglang_servers(recipe), placement.servers, strict=True)
    ):
        port = ports.engine + PORT_STRIDE * index
        url = f"http://{hosts[placed.slots[0].node]}:{port}"
        if server.teachers:
            for i in server.teachers:
                resolved["teachers"]["teachers"][i].update(engine="url", url=url)
        else:
            resolved["rollout"].update(engine="url", url=url)
        for rank, slot in enumerate(placed.slots):
            argv = _server_argv(server.cfg, server.model_path, port,
                                ports.nccl + PORT_STRIDE * index, placed, rank, hosts,
                                ports.dist_init + PORT_STRIDE * index)
            env = {**recipe.launch.env, "CUDA_VISIBLE_DEVICES": _devices(slot.gpus)}
            log = str(folder / f"server-{server.name}-{rank}.log")
            nodes[slot.node].append(Process(f"server {server.name}", argv, env, log))
    commands = JobCommands(hosts, folder, resolved, nodes)
    student = placement.student
    master = hosts[student.slots[0].node]
    for rank, slot in enumerate(student.slots):
        argv = [
            sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(student.slots)}",
            f"--node-rank={rank}", f"--nproc-per-node={len(slot.gpus)}",
            f"--master-addr={master}", f"--master-port={ports.master}",
            "-m", "mopd_megatron.cli", "train", str(commands.recipe_path),
        ]
        env = {**STUDENT_ENV, **recipe.launch.env, "CUDA_VISIBLE_DEVICES": _devices(slot.gpus)}
        log = str(folder / f"student-{rank}.log")
        nodes[slot.node].append(Process("student", argv, env, log))
        commands.student_nodes.append(slot.node)
    return commands


def write_resolved_recipe(commands: JobCommands) -> Path:
    """Write the resolved recipe to <launch dir>/recipe.yaml (atomically) and return its path."""
    commands.launch_dir.mkdir(parents=True, exist_ok=True)
    path = commands.recipe_path
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(commands.resolved, sort_keys=False))
    tmp.replace(path)
    return path


def _server_argv(
    cfg: EngineConfig, model_path: str, port: int, nccl_port: int, placed: Placed, rank: int,
    hosts: list[str], dist_port: int,
) -> list[str]:
    extra = [*cfg.extra_args, "--nccl-port", str(nccl_port)]
    if len(placed.slots) > 1:
        extra += ["--nnodes", str(len(placed.slots)), "--node-rank", str(rank),
                  "--dist-init-addr", f"{hosts[placed.slots[0].node]}:{dist_port}"]
    served = dataclasses.replace(cfg, engine="sglang", host="0.0.0.0", extra_args=extra)
    return launch_command(served, model_path, port)


def _devices(gpus: tuple[int, ...]) -> str:
    return ",".join(str(gpu) for gpu in gpus)
