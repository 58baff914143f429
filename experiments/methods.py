"""The table's methods: how each one turns the toy world into a final student.

Every method consumes a `Context` (the built world, this seed's folder, the budget, the
results of the methods run before it) and produces a `MethodRun` (the final student's HF
folder, its training segments for the curves, the training samples it used, notes).

On-policy methods all run `mopd-megatron train` on `recipes/demo_cpu.yaml` (the CPU demo's
engines and loop), with the same steps and rollout samples per step, differing only in
typed recipe edits (`config.edit_recipe`), saved beside each run as `<method>.yaml`:

| method | loss | samples per step |
|---|---|---|
| MOPD | pg (sampled-token advantage, α = 0) | prompts × 1 |
| MOPD top-k | corrected teacher top-k (k < vocabulary) | prompts × 1 |
| MOPD full-vocab RKL | exact reverse KL (local Megatron teachers) | prompts × 1 |
| MOPD + ORM | pg + α · GRPO outcome advantage | prompts/G × G |
| Mix-RL | GRPO: outcome advantage only, mixed domains | prompts/G × G |
| Cascade RL | GRPO one domain after another (`cascade`) | prompts/G × G |

RFT is `train` with the sft objective over verified teacher samples
(`rollout.source: teacher_samples`); the merges (`merge`) train nothing. The
second MOPD round (`round2`) continues from MOPD's student with re-derived teachers, so it
needs `mopd` earlier in the same seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from experiments import merge
from experiments.cascade import cascade_stages, run_cascade
from experiments.curves import Segment
from experiments.evaluation import evaluate_folder, normalized
from experiments.launch import run_train
from experiments.round2 import derive_teachers
from mopd_megatron.config import Recipe, TeacherConfig, edit_recipe, load_recipe
from mopd_megatron.data import load_prompts
from mopd_megatron.demo.run import RECIPE, world_recipe
from mopd_megatron.demo.toy_world import World


@dataclass
class Budget:
    """What every method gets; one per profile of the table runner."""

    steps: int = 120
    """Steps of every on-policy run (Cascade RL splits them over its stages)."""
    samples_per_step: int = 256
    """Rollout samples per step (prompts × samples per prompt) of every on-policy method."""
    group_size: int = 8
    """GRPO group size (Mix-RL, Cascade RL, MOPD + ORM)."""
    eval_interval: int = 10
    """Steps between dev evaluations (the curves)."""
    lr: dict[str, float] = field(default_factory=lambda: {"pg": 3e-4, "grpo": 1e-4, "sft": 3e-4})
    """Learning rate per family: pg (MOPD variants), grpo (Mix-RL, Cascade RL), sft (RFT); the
    defaults are the toy table's `--lr-search` picks (docs/toy_table.md)."""
    topk: int = 4
    """k of the MOPD top-k variant (the toy vocabulary has 42 tokens; 64 would be exact)."""
    orm_coef: float = 1.0
    """α of MOPD + ORM."""
    rft_samples_per_prompt: int = 1
    """Teacher samples per prompt for RFT; its prompts make steps × samples_per_step draws."""
    round2_target: float = 0.9
    """Dev accuracy at which a round-2 teacher's SFT stops."""
    cascade_order: tuple[str, ...] = ()
    """Cascade RL's domain order; empty = the world's domain order."""
    merge_lambdas: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    """Task-arithmetic λ grid (one λ for every teacher), picked on dev."""
    eval_draws: int = 2
    """Sampled responses per test prompt for the sampled accuracy."""
    micro_batch_size: int = 256


LR_FAMILY = {
    **dict.fromkeys(["mopd", "mopd_topk", "mopd_full_rkl", "mopd_orm", "mopd_round2"], "pg"),
    **dict.fromkeys(["mix_rl", "cascade_rl"], "grpo"),
    "rft": "sft",
}
"""The learning-rate family of each trained method (`Budget.lr`)."""
PRIVATE_FIELDS = {
    "group_size": {"mopd_orm", "mix_rl", "cascade_rl"},
    "topk": {"mopd_topk"},
    "orm_coef": {"mopd_orm"},
    "rft_samples_per_prompt": {"rft"},
    "round2_target": {"mopd_round2"},
    "cascade_order": {"cascade_rl"},
    "merge_lambdas": {"merge_ta"},
}
"""Budget fields that only some methods read; the others' results do not depend on them."""


@dataclass
class Context:
    """What a method runs on: one seed's world, folder and budget."""

    world: World
    out: Path
    """This seed's folder (one sub-folder per method)."""
    seed: int
    budget: Budget
    done: dict[str, MethodRun] = field(default_factory=dict)
    """Methods already run for this seed."""


@dataclass
class MethodRun:
    """What a method produced."""

    model: str
    """The final student's HF folder."""
    segments: list[Segment] = field(default_factory=list)
    samples: int = 0
    """Training samples used (rollouts; teacher samples for RFT)."""
    notes: str = ""


OUTCOME_ONLY = {"algorithm": {"loss": "grpo"}}
"""GRPO: the outcome advantage only; the teachers are not queried for training."""


def base_recipe(ctx: Context, run_dir: Path, method: str, group: int) -> Recipe:
    """What every on-policy run shares: world paths, dev curves, TP=1, the budget."""
    b = ctx.budget
    return edit_recipe(
        world_recipe(load_recipe(RECIPE), ctx.world, run_dir),
        data={"eval_files": [str(ctx.world.dev_file)],
              "prompts_per_step": b.samples_per_step // group},
        parallel={"tp": 1, "ep": 1, "micro_batch_size": b.micro_batch_size},
        rollout={"n_samples_per_prompt": group, "sync_check": False},
        optimizer={"lr": b.lr[LR_FAMILY[method]]},
        train={"steps": b.steps, "seed": ctx.seed},
        logging={"eval_interval": b.eval_interval, "tensorboard": False},
        checkpoint={"save_interval": b.steps},
    )


def train(ctx: Context, name: str, group: int, **edits: dict) -> tuple[Recipe, Segment]:
    """One `mopd-megatron train` run of the demo recipe; returns it and its curve segment."""
    run_dir = ctx.out / name
    recipe = edit_recipe(base_recipe(ctx, run_dir, name, group), **edits)
    run_train(recipe, ctx.out / name)
    return recipe, Segment(str(run_dir), ctx.budget.samples_per_step)


def _single(ctx: Context, name: str, group: int, **edits: dict) -> MethodRun:
    recipe, segment = train(ctx, name, group, **edits)
    b = ctx.budget
    return MethodRun(str(recipe.hf_export_dir), [segment], b.steps * b.samples_per_step)


def mopd(ctx: Context) -> MethodRun:
    return _single(ctx, "mopd", 1, algorithm={"loss": "pg", "orm_coef": 0.0})


def mopd_topk(ctx: Context) -> MethodRun:
    return _single(ctx, "mopd_topk", 1,
                   algorithm={"loss": "topk", "topk": ctx.budget.topk, "orm_coef": 0.0})


def mopd_full_rkl(ctx: Context) -> MethodRun:
    return _single(ctx, "mopd_full_rkl", 1, algorithm={"loss": "full_rkl", "orm_coef": 0.0})


def mopd_orm(ctx: Context) -> MethodRun:
    return _single(ctx, "mopd_orm", ctx.budget.group_size,
                   algorithm={"loss": "pg", "orm_coef": ctx.budget.orm_coef})


def mix_rl(ctx: Context) -> MethodRun:
    return _single(ctx, "mix_rl", ctx.budget.group_size, **OUTCOME_ONLY)


def cascade_rl(ctx: Context) -> MethodRun:
    b = ctx.budget
    stages = cascade_stages(list(b.cascade_order or ctx.world.domains), b.steps)
    out = ctx.out / "cascade_rl"
    recipe = edit_recipe(base_recipe(ctx, out, "cascade_rl", b.group_size), **OUTCOME_ONLY)
    runs = run_cascade(recipe, stages, out)
    segments, offset = [], 0
    for run, (_, steps) in zip(runs, stages):
        segments.append(Segment(run.logging.dir, b.samples_per_step, offset))
        offset += steps * b.samples_per_step
    order = " -> ".join(f"{d} ({n} steps)" for d, n in stages)
    return MethodRun(str(runs[-1].hf_export_dir), segments, offset, f"order {order}")


def rft(ctx: Context) -> MethodRun:
    """Fine-tuning on verified teacher samples: `train` with the sft objective over the
    teacher-sample source."""
    b = ctx.budget
    n = b.rft_samples_per_prompt
    prompts = b.steps * b.samples_per_step // n
    recipe, segment = train(
        ctx, "rft", n, data={"prompts_per_step": b.samples_per_step}, algorithm={"loss": "sft"},
        rollout={"source": "teacher_samples", "teacher_sample_prompts": prompts},
    )
    return MethodRun(
        str(recipe.hf_export_dir),
        [segment],
        prompts * n,
        f"{prompts} prompts x {n} teacher samples, SFT {b.steps} x {b.samples_per_step} sequences",
    )


def merge_avg(ctx: Context) -> MethodRun:
    out = ctx.out / "merge_avg"
    merge.average(out, [ctx.world.teacher_paths[d] for d in ctx.world.domains])
    return MethodRun(str(out))


def merge_ta(ctx: Context) -> MethodRun:
    """Task arithmetic with the λ of the grid that scores best on dev (greedy)."""
    w, b = ctx.world, ctx.budget
    dev = load_prompts(w.dev_file)
    start = w.accuracy["base"]["dev"]
    teachers = {d: w.accuracy[d]["dev"][d] for d in w.domains}
    best = None
    for lam in b.merge_lambdas:
        out = ctx.out / f"merge_ta/lambda_{lam:g}"
        merge.task_arithmetic(out, w.base_path, [w.teacher_paths[d] for d in w.domains], lam)
        acc = evaluate_folder(out, dev, draws=0, max_new_tokens=w.max_new_tokens)["greedy"]
        score = normalized(acc, start, teachers)["mean"]
        if best is None or score > best[0]:
            best = (score, lam, out)
    return MethodRun(
        str(best[2]),
        notes=f"λ = {best[1]:g} (dev-selected from {', '.join(f'{x:g}' for x in b.merge_lambdas)})",
    )


def mopd_round2(ctx: Context) -> MethodRun:
    if "mopd" not in ctx.done:
        raise ValueError("mopd_round2 continues from mopd: list mopd before it")
    first = ctx.done["mopd"]
    teachers = derive_teachers(
        first.model,
        ctx.world,
        ctx.out / "mopd_round2" / "teachers",
        ctx.budget.round2_target,
        ctx.seed,
    )
    listed = [TeacherConfig(name=f"{d}-teacher", domains=[d], model_path=t["path"])
              for d, t in sorted(teachers.items())]
    recipe, segment = train(ctx, "mopd_round2", 1, algorithm={"loss": "pg", "orm_coef": 0.0},
                       model={"hf_path": first.model}, teachers={"teachers": listed})
    segment.offset = first.samples
    devs = ", ".join(f"{d} {t['dev']:.2f}" for d, t in teachers.items())
    return MethodRun(
        str(recipe.hf_export_dir),
        [*first.segments, segment],
        first.samples + ctx.budget.steps * ctx.budget.samples_per_step,
        f"round-2 teachers' dev accuracy: {devs}",
    )


METHODS: dict[str, Callable[[Context], MethodRun]] = {
    "mopd": mopd,
    "mopd_topk": mopd_topk,
    "mopd_full_rkl": mopd_full_rkl,
    "mopd_orm": mopd_orm,
    "mopd_round2": mopd_round2,
    "mix_rl": mix_rl,
    "cascade_rl": cascade_rl,
    "rft": rft,
    "merge_avg": merge_avg,
    "merge_ta": merge_ta,
}
"""Every method, in the order the runner runs them (round 2 after MOPD)."""
