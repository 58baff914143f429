"""`mopd-megatron` command line: train, demo, convert, plan, launch.

`train` starts torchrun by itself when the recipe's layout needs more than
one rank and the command was not already launched by torchrun (or SLURM's srun through
tools/launch).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import RecipeError
from .launch import cli as launch_cli
from .launch.local import needs_relaunch, relaunch_under_torchrun
from .plan import cli as plan_cli


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_recipe
    from .data.records import check_prompt_files
    from .hf.spec import read_hf_config

    recipe = load_recipe(args.recipe, args.overrides)
    # Missing inputs fail here in one line, before any rank or engine starts.
    read_hf_config(recipe.model.hf_path)
    check_prompt_files([*recipe.data.train_files, *recipe.data.eval_files])
    if args.rollout_only:  # the engines only: no Megatron, no torchrun
        from .sources import rollout_only

        rollout_only(recipe, args.rollout_only)
        return 0
    if needs_relaunch(recipe.parallel.nproc):
        return relaunch_under_torchrun(recipe.parallel.nproc, "mopd_megatron.cli", sys.argv[1:])
    from .train import train

    train(recipe, train_only=args.train_only)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    return run_demo(args.out, layout=args.layout, quick=args.quick, overrides=args.overrides)


def cmd_convert(args: argparse.Namespace) -> int:
    from .config import ParallelConfig
    from .hf import convert

    if args.direction == "hf-to-megatron":
        layout = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep)
        convert.hf_to_megatron(args.hf_path, args.megatron_path, layout)
    else:
        ckpt = Path(args.megatron_path)
        # A training run keeps one hf_config/ beside its iter_*/ checkpoints.
        config = args.hf_config or next(
            (d for d in (ckpt / convert.HF_CONFIG_DIR, ckpt.parent / convert.HF_CONFIG_DIR)
             if d.is_dir()), None)
        convert.megatron_to_hf(ckpt, args.hf_path, hf_config_dir=config)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mopd-megatron", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run MOPD training from a YAML recipe")
    train.add_argument("recipe", help="recipe YAML (see recipes/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    debug = train.add_mutually_exclusive_group()
    debug.add_argument("--rollout-only", metavar="DIR",
                       help="debug: sample and score train.steps steps with the initial weights "
                            "and save them in DIR (engines only, no training)")
    debug.add_argument("--train-only", metavar="DIR",
                       help="debug: train on the trajectories a --rollout-only run saved in DIR "
                            "(no engines: no weight sync, no evaluation)")
    train.set_defaults(func=cmd_train)

    demo = sub.add_parser("demo", help="build the toy world and run MOPD on CPU end to end")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--layout", choices=["tp2", "ep2", "tp1"], default="ep2",
                      help="student layout over gloo (tp2 = TP=2+SP, ep2 = EP=2 x DP=2)")
    demo.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    demo.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    demo.set_defaults(func=cmd_demo)

    convert = sub.add_parser("convert", help="convert checkpoints between HF and Megatron")
    convert.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    convert.add_argument("--hf-path", required=True)
    convert.add_argument("--megatron-path", required=True)
    convert.add_argument("--hf-config", default=None,
                         help="megatron-to-hf: folder with config.json + tokenizer (default: "
                              "the checkpoint's hf_config/, or its parent's)")
    convert.add_argument("--tp", type=int, default=1)
    convert.add_argument("--pp", type=int, default=1)
    convert.add_argument("--ep", type=int, default=1)
    convert.set_defaults(func=cmd_convert)

    plan_cli.add_parser(sub)
    launch_cli.add_parser(sub)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """Bad input that deserves a one-line message rather than a traceback."""
    from .data import PromptDataError
    from .hf.safetensors_io import HFCheckpointError
    from .hf.spec import HFConfigError
    from .rollout.transport import EngineError
    from .student.checkpoint import CheckpointError

    return RecipeError, HFConfigError, HFCheckpointError, PromptDataError, EngineError, \
        CheckpointError, FileNotFoundError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mopd_megatron").setLevel(logging.INFO)  # our progress, not Megatron's
    return run_reporting_errors(f"mopd-megatron {args.command}", args.func, args)


def run_reporting_errors(prog: str, func, *args) -> int:
    """Run a command: bad input ends in one line on stderr and exit code 2, not a traceback."""
    try:
        return func(*args) or 0
    except user_errors() as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`... --dry-run | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
