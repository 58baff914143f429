"""`mopd-megatron plan RECIPE`: print the plan of a recipe's job and say whether it can run.

    mopd-megatron plan RECIPE [key.sub=value ...] [--model-config DIR] [--meta]

Exit status 0 when the job fits, 1 when the plan finds problems (or `--meta` finds a count
that differs from Megatron's), 2 for a recipe or model config that cannot be read. `--meta`
also builds one rank of every pipeline stage on the meta device at the recipe's layout
(`plan.meta`) and compares its parameter count with the plan's.
"""

from __future__ import annotations

import argparse
import sys

from mopd_megatron.config import RecipeError, load_recipe
from mopd_megatron.hf.spec import HFConfigError
from mopd_megatron.plan.params import PlanError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments `plan` shares with `launch`: recipe, overrides, --model-config."""
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=4")
    parser.add_argument(
        "--model-config", metavar="DIR",
        help="config.json (or a folder holding one) for every model whose folder is not on "
             "this machine, e.g. recipes/models/qwen3_30b_a3b (default: the recipe's "
             "launch.model_config)",
    )


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `plan`'s arguments to `parser` and make `main` its command."""
    add_arguments(parser)
    parser.add_argument("--meta", action="store_true",
                        help="also build each pipeline stage's rank on the meta device and "
                             "compare its parameter count with the plan")
    parser.set_defaults(func=main)
    return parser


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `plan` on the CLI's subparsers; the command runs `main(args)`."""
    return configure(
        subparsers.add_parser("plan", help="memory, GPUs and feasibility of a recipe's job")
    )


def main(args: argparse.Namespace) -> int:
    """Run `plan` (see the module docstring); returns the exit status."""
    from mopd_megatron.plan.planner import make_plan
    from mopd_megatron.plan.report import format_plan

    try:
        plan = make_plan(load_recipe(args.recipe, args.overrides), args.model_config)
    except (RecipeError, HFConfigError, PlanError) as err:
        print(f"mopd-megatron plan: error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    status = 0 if plan.ok else 1
    if args.meta:
        status = max(status, _compare_on_meta(plan))
    return status


def _compare_on_meta(plan) -> int:
    from mopd_megatron.plan.meta import meta_rank_params

    p = plan.recipe.parallel
    built = meta_rank_params(plan.spec, plan.recipe.model, p, plan.shape.world_size,
                             plan.padded_vocab)
    status = 0
    print(f"meta      one rank per stage built on the meta device (tp {p.tp}, pp {p.pp}, "
          f"ep {p.ep}, etp {p.etp}, vpp {p.vpp or 1}):")
    for stage, (planned, meta) in enumerate(zip(plan.stages, built, strict=True)):
        same = (planned.params.dense, planned.params.expert) == (meta.dense, meta.expert)
        status = status if same else 1
        print(f"  stage {stage}: Megatron {meta.dense} dense + {meta.expert} expert = "
              f"{meta.total}; plan {planned.params.total}: {'equal' if same else 'DIFFERENT'}")
    return status
