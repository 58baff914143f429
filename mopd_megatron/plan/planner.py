"""Planner stage: will this recipe run, and on how many GPUs? Checked before anything queues.

Consumes a loaded `Recipe` (and, optionally, a config.json standing in for model folders that
are not on this machine yet); produces a `Plan`: the student's parameter counts, its step
shape and memory per pipeline stage (`plan.memory`, with the teachers' share in the trainer
from `plan.payload`), the SGLang servers (`plan.serving`), the node placement
(`plan.placement`), the teacher payload's bytes per token and step, and `problems`, every reason the job cannot run: a layout
Megatron cannot build, a batch that does not divide, a rank or server that does not fit.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from mopd_megatron.config import EngineConfig, Recipe, RecipeError
from mopd_megatron.hf.layout import padded_vocab_size
from mopd_megatron.hf.spec import HFModelSpec, read_hf_config, spec_from_dict
from mopd_megatron.plan.memory import StageMemory, StepShape, student_memory
from mopd_megatron.plan.params import (
    ModelParams,
    PlanError,
    check_countable,
    model_params,
)
from mopd_megatron.plan.payload import PayloadPlan, payload_plan
from mopd_megatron.plan.placement import Placement, place
from mopd_megatron.plan.serving import GIB, ServerPlan, plan_server, server_gpus
from mopd_megatron.student.layout import validate_layout


@dataclass
class Plan:
    recipe: Recipe
    spec: HFModelSpec
    spec_source: str
    """The config.json the student's numbers come from."""
    params: ModelParams
    padded_vocab: int
    shape: StepShape
    stages: list[StageMemory]
    usable_bytes: int
    """What a student rank may use: memory_utilization * GPU memory."""
    servers: list[ServerPlan]
    placement: Placement
    problems: list[str] = field(default_factory=list)
    payload: PayloadPlan | None = None
    """The teachers' payload: bytes per token and step, and its memory in the trainer."""

    @property
    def ok(self) -> bool:
        return not self.problems


def load_spec(model_dir: str, key: str, fallback: str | None) -> tuple[HFModelSpec, str]:
    """The architecture of the model in `model_dir`, or of `fallback` when the folder is not
    here (planning before the checkpoints are downloaded).

    Args:
        model_dir: the recipe's model folder.
        key: its recipe key, for messages.
        fallback: a config.json, or a folder holding one, or None.

    Returns:
        (the spec, the path of the config.json it came from).
    """
    own = Path(model_dir) / "config.json"
    if own.is_file():
        return read_hf_config(model_dir), str(own)
    if fallback is None:
        raise PlanError(
            f"{key}: {own} not found; to plan before the checkpoint is on this machine, set "
            "the recipe's launch.model_config or pass --model-config DIR (a folder with the "
            "model's config.json)"
        )
    path = Path(fallback)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise PlanError(f"launch.model_config / --model-config: {path} not found")
    return spec_from_dict(json.loads(path.read_text()), source=str(path)), str(path)


def recipe_model_config(recipe: Recipe) -> str | None:
    """The recipe's `launch.model_config`, a relative path taken from the recipe's folder."""
    value = recipe.launch.model_config
    if not value:
        return None
    source = Path(recipe.source)
    return str(source.parent / value) if source.is_file() else value


@dataclass(frozen=True)
class LaunchedServer:
    """An SGLang server the job launches."""

    name: str
    """'rollout', or the names of the teachers it serves joined by '+'."""
    key: str
    """Recipe key of its settings: 'rollout' or 'teachers.teachers[i]' (the first teacher)."""
    cfg: EngineConfig
    model_path: str
    teachers: tuple[int, ...] = ()
    """Indices of the teachers it serves."""


def sglang_servers(recipe: Recipe) -> list[LaunchedServer]:
    """The SGLang servers the job launches: the rollout engine, then one per distinct teacher
    model folder (as `teachers.TeacherPool` shares them)."""
    servers = []
    if recipe.rollout.engine == "sglang":
        model_path = recipe.rollout.model_path or recipe.model.hf_path
        servers.append(LaunchedServer("rollout", "rollout", recipe.rollout, model_path))
    by_model: dict[str, list[int]] = {}
    for i, teacher in enumerate(recipe.teachers.teachers):
        if teacher.engine == "sglang":
            by_model.setdefault(teacher.model_path, []).append(i)
    for model_path, members in by_model.items():
        teachers = recipe.teachers.teachers
        servers.append(LaunchedServer(
            "+".join(teachers[i].name for i in members), f"teachers.teachers[{members[0]}]",
            teachers[members[0]], model_path, tuple(members),
        ))
    return servers


def make_plan(recipe: Recipe, model_config: str | None = None) -> Plan:
    """Plan the recipe's job (see the module docstring).

    Args:
        recipe: a loaded, validated recipe.
        model_config: config.json (or its folder) for every model whose folder is missing;
            None = the recipe's `launch.model_config`.

    Returns:
        The plan; `plan.problems` is empty when the job can run.

    Raises:
        PlanError: a model config cannot be found or counted.
    """
    model_config = model_config or recipe_model_config(recipe)
    spec, spec_source = load_spec(recipe.model.hf_path, "model.hf_path", model_config)
    check_countable(spec, spec_source)
    p, launch = recipe.parallel, recipe.launch
    world = p.nproc
    padded = padded_vocab_size(spec.vocab_size, recipe.model.make_vocab_size_divisible_by, p.tp)
    problems = _layout_problems(recipe, spec, world)
    shape, stages = student_memory(spec, recipe, world, padded)
    payload = payload_plan(recipe, spec, lambda i, t: load_spec(
        t.model_path, f"teachers.teachers[{i}].model_path", model_config)[0], padded, shape)
    last = stages[-1]  # the loss, and so the teachers' heads or models, live on the last stage
    stages[-1] = dataclasses.replace(last, kl_buffers=last.kl_buffers + payload.trainer_bytes)
    problems += _batch_problems(recipe, shape)
    usable = int(launch.memory_utilization * launch.gpu_memory_gib * GIB)
    for stage in stages:
        if stage.total > usable:
            problems.append(
                f"a student rank of pipeline stage {stage.stage} needs "
                f"{stage.total / GIB:.1f} GiB, more than the {usable / GIB:.1f} GiB usable "
                f"(launch.memory_utilization * launch.gpu_memory_gib)"
            )
    servers, groups = [], []
    for launched in sglang_servers(recipe):
        key = launched.key
        server_spec, _ = load_spec(launched.model_path, f"{key}.model_path", model_config)
        check_countable(server_spec, launched.model_path)
        server = plan_server(launched.name, key, launched.cfg, launched.model_path, server_spec,
                             launch.gpu_memory_gib, shape.seq_len)
        if server_spec.vocab_size != spec.vocab_size:
            server.problems.append(
                f"{key}: vocabulary of {server_spec.vocab_size} tokens, the student has "
                f"{spec.vocab_size}"
            )
        servers.append(server)
        group = "teachers" if launched.teachers else "rollout"
        groups.append((launched.name, group, server_gpus(launched.cfg)))
        problems += server.problems
    placement = place(world, groups, launch.gpus_per_node)
    problems += placement.problems
    problems += _sync_problems(recipe, placement)
    return Plan(recipe, spec, spec_source, model_params(spec), padded, shape, stages, usable,
                servers, placement, problems, payload)


def _layout_problems(recipe: Recipe, spec: HFModelSpec, world: int) -> list[str]:
    p = recipe.parallel
    problems = []
    try:
        validate_layout(
            p, world, num_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
            num_query_groups=spec.num_key_value_heads, num_experts=spec.num_experts,
            source=recipe.source,
        )
    except RecipeError as err:
        problems.append(str(err))
    if p.cp > 1:
        problems.append("parallel.cp > 1: the trainer does not split sequences over "
                        "context-parallel ranks yet (student/forward.py)")
    if p.vpp and p.pp == 2:
        problems.append("parallel.vpp with pp = 2: Megatron's interleaved schedule then needs "
                        "batch_p2p_comm=False, which the student's config does not set "
                        "(student/forward.py refuses it); use pp >= 3 or no vpp")
    return problems


def _batch_problems(recipe: Recipe, shape: StepShape) -> list[str]:
    p = recipe.parallel
    problems = []
    if shape.sequences % shape.dp:
        problems.append(
            f"{shape.sequences} sequences per step (data.prompts_per_step * "
            f"rollout.n_samples_per_prompt) cannot be split over {shape.dp} data-parallel ranks"
        )
    per_rank = shape.sequences // shape.dp
    if p.pp > 1 and per_rank % p.micro_batch_size:
        problems.append(
            f"pipeline parallelism needs equal micro-batches: {per_rank} sequences per DP rank "
            f"are not divisible by parallel.micro_batch_size = {p.micro_batch_size}"
        )
    if p.vpp and shape.micro_batches % p.pp:
        problems.append(
            f"the interleaved schedule (parallel.vpp) needs the {shape.micro_batches} "
            f"micro-batches per DP rank to be a multiple of pp = {p.pp}"
        )
    return problems


def _sync_problems(recipe: Recipe, placement: Placement) -> list[str]:
    rollout = next((s for s in placement.servers if s.group == "rollout"), None)
    if rollout is None or recipe.rollout.sync_mode != "tensor":
        return []
    if rollout.slots[0].node != placement.student.slots[0].node:
        return [("rollout.sync_mode 'tensor' passes CUDA tensors within one node, but the "
                 "rollout server runs on another node than the trainer's rank 0; use "
                 "'distributed' (or 'disk' on a shared filesystem)")]
    return []
