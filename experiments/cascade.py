"""Cascade RL baseline: GRPO on one domain after another, each stage a `mopd-megatron train` run.

Consumes a recipe whose algorithm is outcome-only RL (GRPO), a domain order and steps per
stage; produces one run folder per stage, `<out>/<i>_<domain>/`, each starting from the
previous stage's exported student (`checkpoints/hf`) and sampling only its own domain
(`data.domain_weights={domain: 1}`). The last stage's `checkpoints/hf` is the result.

Command line (from the repository root):
    python -m experiments.cascade RECIPE --out DIR --order math,if,swe \
        --steps 100 [100 100] [key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.launch import run_train
from mopd_megatron.cli import run_reporting_errors
from mopd_megatron.config import Recipe, edit_recipe, load_recipe


def cascade_stages(order: list[str], total_steps: int) -> list[tuple[str, int]]:
    """Split `total_steps` over the domains in order (earlier stages take the remainder)."""
    share, extra = divmod(total_steps, len(order))
    return [(domain, share + (i < extra)) for i, domain in enumerate(order)]


def run_cascade(
    recipe: Recipe, stages: list[tuple[str, int]], out: str | Path, start: str | Path | None = None
) -> list[Recipe]:
    """Run the stages in order.

    Args:
        recipe: the GRPO recipe (student, teachers, data, algorithm, optimizer).
        stages: (domain, steps) per stage, in order.
        out: the folder of the stages' recipes, run folders and logs.
        start: the first stage's student (default: the recipe's `model.hf_path`).

    Returns:
        The stages' recipes, in order (run folder: `logging.dir`; student: `hf_export_dir`).
    """
    out, runs = Path(out), []
    for i, (domain, steps) in enumerate(stages, start=1):
        run_dir = out / f"{i}_{domain}"
        stage = edit_recipe(
            recipe,
            logging={"dir": str(run_dir)},
            checkpoint={"dir": str(run_dir / "checkpoints"), "save_interval": steps},
            train={"steps": steps},
            data={"domain_weights": {domain: 1.0}},
            model={"hf_path": str(start or recipe.model.hf_path)},
        )
        run_train(stage, out / f"{i}_{domain}")
        runs.append(stage)
        start = stage.hf_export_dir
    return runs


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run a cascade from the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="an outcome-only RL recipe (algorithm.loss: grpo)")
    parser.add_argument("--out", required=True, help="folder of the stages' runs")
    parser.add_argument("--order", required=True, help="comma-separated domains, in order")
    parser.add_argument(
        "--steps",
        nargs="+",
        type=int,
        required=True,
        help="total steps (split evenly) or one count per stage",
    )
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for every stage")
    args = parser.parse_intermixed_args(argv)
    order = args.order.split(",")
    if len(args.steps) == 1:
        stages = cascade_stages(order, args.steps[0])
    elif len(args.steps) == len(order):
        stages = list(zip(order, args.steps))
    else:
        parser.error(f"--steps: give one total or {len(order)} counts")
    for stage in run_cascade(load_recipe(args.recipe, args.overrides), stages, args.out):
        print(stage.logging.dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors("python -m experiments.cascade", main))
