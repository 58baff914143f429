"""`mopd-megatron demo`: build the toy world, run MOPD on it over HTTP, report per domain.

1. Build (or reuse) the toy world: tokenizer, a mediocre Qwen3-MoE student, one better
   teacher per domain, held-out prompt sets.
2. Run `recipes/demo_cpu.yaml` with the world's paths (saved as `<out>/demo_recipe.yaml`),
   the student under Megatron-Core at the chosen layout over gloo (torchrun), the rollout
   engine and the teachers as embedded CPU engines over HTTP.
3. Print the report: held-out accuracy of the student before and after and of each domain's
   teacher, and the normalized score (student − start) / (teacher − start).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from ..config import Recipe, TeacherConfig, edit_recipe, load_recipe, save_recipe
from .settings import WorldSettings
from .toy_world import World, build_world

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo_cpu.yaml"
LAYOUTS = {"ep2": {"tp": 1, "ep": 2}, "tp2": {"tp": 2, "ep": 1}, "tp1": {"tp": 1, "ep": 1}}
QUICK_WORLD = dict(n_train=200, n_dev=20, n_test=20, base_max_steps=20, teacher_max_steps=10,
                   check_every=10, teacher_check_every=5)
QUICK_RUN = dict(train={"steps": 3}, data={"prompts_per_step": 16},
                 parallel={"micro_batch_size": 4}, checkpoint={"save_interval": 2},
                 logging={"eval_interval": 0}, rollout={"batch_size": 8})


def world_recipe(recipe: Recipe, world: World, run_dir: Path) -> Recipe:
    """Point a recipe at a built world (student, teachers, prompts) and a run folder."""
    teachers = [TeacherConfig(name=f"{d}-teacher", domains=[d], model_path=str(path))
                for d, path in sorted(world.teacher_paths.items())]
    return edit_recipe(
        recipe,
        model={"hf_path": str(world.base_path)},
        data={"train_files": [str(world.train_file)], "eval_files": [str(world.test_file)]},
        teachers={"teachers": teachers},
        rollout={"max_new_tokens": world.max_new_tokens},
        logging={"dir": str(run_dir)},
    )


def run_demo(out: str, layout: str = "ep2", quick: bool = False, overrides=()) -> int:
    """Build the world, train, and print the report; returns the training's exit code."""
    out = Path(out).resolve()
    started = time.perf_counter()
    settings = WorldSettings(**QUICK_WORLD) if quick else WorldSettings()
    world = build_world(out / "world", settings)
    print(f"toy world ready in {time.perf_counter() - started:.0f} s: {out / 'world'}", flush=True)
    recipe = world_recipe(load_recipe(RECIPE), world, out / "run")
    recipe = edit_recipe(recipe, parallel=LAYOUTS[layout])
    if quick:
        recipe = edit_recipe(recipe, **QUICK_RUN)
    path = save_recipe(recipe, out / "demo_recipe.yaml")  # the exact recipe this demo ran
    code = subprocess.call([sys.executable, "-m", "mopd_megatron.cli", "train", str(path),
                            *overrides])
    report = out / "run" / "report.md"
    if code == 0 and report.exists():
        print(report.read_text())
        print(f"demo finished in {(time.perf_counter() - started) / 60:.1f} min; "
              f"report, plots and TensorBoard logs in {out / 'run'}")
    return code
