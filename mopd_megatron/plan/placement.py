"""Planner stage: which nodes and GPUs the student and each SGLang server get.

Consumes the student's world size, each server's GPU count and the GPUs per node; produces a
`Placement`: node groups in job order (student, rollout, teachers) and, for every process
group of the job, the node indices and local GPU ids it runs on. The launcher turns node
indices into host names, ports and commands.

Rules. A job whose GPUs all fit on one node runs there (student on the first GPUs, servers
after it). Otherwise the groups get separate nodes: the student fills whole nodes (or the
first GPUs of one); the rollout server gets nodes of its own; the teacher servers share the
teacher nodes first-fit, each on contiguous GPUs of one node. A server larger than a node
takes whole nodes (SGLang's --nnodes) and so must use a multiple of the GPUs per node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GROUPS = ("student", "rollout", "teachers")


@dataclass(frozen=True)
class Slot:
    """GPUs of one node given to a process group."""

    node: int
    """Index in the job's node list."""
    gpus: tuple[int, ...]
    """Local GPU ids (CUDA_VISIBLE_DEVICES)."""


@dataclass(frozen=True)
class Placed:
    """Where one process group runs: the student, or one SGLang server."""

    name: str
    group: str
    """'student', 'rollout' or 'teachers'."""
    slots: tuple[Slot, ...]
    """One per node it spans, in node-rank order."""


@dataclass
class Placement:
    gpus_per_node: int
    group_nodes: dict[str, int]
    """Nodes of each group, in job order; a one-node job is all 'student'."""
    student: Placed
    servers: list[Placed]
    """In the order given to `place` (rollout first, then teachers)."""
    problems: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> int:
        return sum(self.group_nodes.values())


def place(
    student_gpus: int, servers: list[tuple[str, str, int]], gpus_per_node: int
) -> Placement:
    """Assign nodes and GPUs (see the module docstring).

    Args:
        student_gpus: the student's world size.
        servers: (name, group, GPUs) of each server, group 'rollout' or 'teachers'.
        gpus_per_node: GPUs of one node.

    Returns:
        The placement; `problems` says what cannot be placed.
    """
    g = gpus_per_node
    if student_gpus + sum(gpus for _, _, gpus in servers) <= g:
        return _one_node(student_gpus, servers, g)
    problems = []
    if student_gpus > g and student_gpus % g:
        problems.append(
            f"the student's {student_gpus} ranks (parallel.world_size) must fill whole nodes of "
            f"{g} GPUs (launch.gpus_per_node)"
        )
    student_nodes = -(-student_gpus // g)
    per_node = min(student_gpus, g)
    student = Placed("student", "student", tuple(
        Slot(n, tuple(range(per_node))) for n in range(student_nodes)
    ))
    group_nodes = {"student": student_nodes, "rollout": 0, "teachers": 0}
    placed, free = [], []  # free: [node, next free GPU] of partly used nodes, per group
    for name, group, gpus in servers:
        first = sum(group_nodes.values())
        if gpus > g:
            if gpus % g:
                problems.append(f"server {name!r} spans nodes, so its {gpus} GPUs must be a "
                                f"multiple of launch.gpus_per_node = {g}")
            span = -(-gpus // g)
            slots = tuple(Slot(first + i, tuple(range(g))) for i in range(span))
            group_nodes[group] += span
        else:
            spot = next((f for f in free if f[2] == group and f[1] + gpus <= g), None)
            if spot is None:
                spot = [first, 0, group]
                free.append(spot)
                group_nodes[group] += 1
            slots = (Slot(spot[0], tuple(range(spot[1], spot[1] + gpus))),)
            spot[1] += gpus
        placed.append(Placed(name, group, slots))
    return Placement(g, group_nodes, student, placed, problems)


def _one_node(student_gpus: int, servers: list[tuple[str, str, int]], g: int) -> Placement:
    student = Placed("student", "student", (Slot(0, tuple(range(student_gpus))),))
    placed, start = [], student_gpus
    for name, group, gpus in servers:
        placed.append(Placed(name, group, (Slot(0, tuple(range(start, start + gpus))),)))
        start += gpus
    return Placement(g, {"student": 1, "rollout": 0, "teachers": 0}, student, placed)
