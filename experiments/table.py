"""The toy reproduction of the MOPD paper's comparison table: seeds × methods -> results.

For each seed: build (or reuse) that seed's toy world, evaluate the starting student and
the teachers, run every method in order (`methods.METHODS`), evaluate each final student on
the held-out test prompts (greedy and sampled) and write `<out>/seed<s>/<method>.json`
(accuracy, normalized scores, dev curve, samples, wall time, notes). A result already on
disk is reused, so an interrupted table resumes where it stopped. `--lr-search` first picks
each method family's learning rate on dev (seed 0's world, one run per rate).
`experiments.docs` then turns the results into the Markdown table and the plots.

Command line (from the repository root):
`python -m experiments.table --profile full|ci [--world exact|open] [--seeds 0 1 2]
[--lr-search] ...`; `--world open` runs the table on the open-answer world
(`demo.settings.WORLDS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.curves import Segment, normalized_curve
from experiments.docs import machine, write_docs
from experiments.evaluation import evaluate_folder, normalized
from experiments.methods import (
    LR_FAMILY,
    METHODS,
    PRIVATE_FIELDS,
    Budget,
    Context,
    MethodRun,
)
from mopd_megatron.cli import run_reporting_errors
from mopd_megatron.data import load_prompts
from mopd_megatron.demo.settings import WORLDS, WorldSettings
from mopd_megatron.demo.toy_world import World, build_world

logger = logging.getLogger(__name__)


@dataclass
class Profile:
    """A world size and a budget for every method."""

    world: dict = field(default_factory=dict)
    """`WorldSettings` fields other than the seed."""
    budget: Budget = field(default_factory=Budget)
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    """Learning rates tried by `--lr-search`."""


PROFILES = {
    "full": Profile(),
    "ci": Profile(
        world={
            "domains": ["add", "rev"],
            "n_train": 200,
            "batch_size": 32,
            "n_dev": 16,
            "n_test": 16,
            "base_max_steps": 20,
            "teacher_max_steps": 10,
            "check_every": 10,
            "teacher_check_every": 5,
            "rl_max_steps": 2,
            "rl_check_every": 1,
            "rl_prompts": 4,
            "rl_group": 2,
        },
        budget=Budget(
            steps=2,
            samples_per_step=16,
            group_size=4,
            eval_interval=1,
            rft_samples_per_prompt=2,
            merge_lambdas=(0.5, 1.0),
            eval_draws=1,
            micro_batch_size=16,
        ),
        lr_grid=(1e-4, 3e-4),
    ),
}
"""`full`: the documented table (3 domains, 120 steps × 256 samples per on-policy run);
`ci`: a smoke test (2 domains, 2 steps × 16 samples) that exercises every method."""

LR_SEARCH = {"pg": "mopd", "grpo": "mix_rl", "sft": "rft"}
"""The method whose dev score picks each family's learning rate."""


def world_settings(profile: Profile, name: str) -> dict:
    """The named world's `WorldSettings` fields under the profile's sizes; the world's own
    domains win over the profile's."""
    named = WORLDS[name]
    return {**named, **profile.world, **{k: named[k] for k in ("domains",) if k in named}}


def reference_scores(world: World, test, budget: Budget) -> dict:
    """Test accuracy (greedy, sampled) of the starting student and of each domain's teacher."""
    kw = {"draws": budget.eval_draws, "max_new_tokens": world.max_new_tokens}
    base = evaluate_folder(world.base_path, test, **kw)
    teachers = {d: evaluate_folder(p, test, **kw) for d, p in world.teacher_paths.items()}
    own = {m: {d: teachers[d][m][d] for d in world.domains} for m in base}
    return {"base": base, "teachers": own, "teachers_all_domains": teachers}


def evaluate_method(ctx: Context, name: str, run: MethodRun, ref: dict, test, seconds: float):
    """The result record of one method on one seed."""
    w = ctx.world
    acc = evaluate_folder(
        run.model, test, draws=ctx.budget.eval_draws, seed=ctx.seed, max_new_tokens=w.max_new_tokens
    )
    dev_start = w.accuracy["base"]["dev"]
    dev_teachers = {d: w.accuracy[d]["dev"][d] for d in w.domains}
    return {
        "method": name,
        "seed": ctx.seed,
        "model": run.model,
        "test": acc,
        "normalized": {m: normalized(acc[m], ref["base"][m], ref["teachers"][m]) for m in acc},
        "curve": normalized_curve(run.segments, dev_start, dev_teachers),
        "samples": run.samples,
        "seconds": round(seconds, 1),
        "notes": run.notes,
        "lr": ctx.budget.lr.get(LR_FAMILY.get(name, "")),
    }


def _relevant(name: str, stamp: dict) -> dict:
    """The part of a stamp (world key, full budget) that decides method `name`'s result."""
    budget = stamp["budget"]
    kept = {k: v for k, v in budget.items() if name in PRIVATE_FIELDS.get(k, {name})}
    kept["lr"] = budget["lr"].get(LR_FAMILY.get(name, ""))
    return json.loads(json.dumps({"world": stamp["world"], "budget": kept}))


def _stored(path: Path, stamp: dict, name: str) -> dict | None:
    """The record at `path` when the world and the budget fields that decide method `name`
    are those of `stamp`, else None."""
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    same = "stamp" in record and _relevant(name, record["stamp"]) == _relevant(name, stamp)
    return record if same else None


def _save(path: Path, record: dict, stamp: dict) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**record, "stamp": stamp}, indent=2))
    return record


def _world(out: Path, seed: int, profile: Profile) -> tuple[World, str]:
    world = build_world(out / f"world{seed}", WorldSettings(seed=seed, **profile.world))
    return world, json.loads((world.root / "world.json").read_text())["key"]


def run_method(ctx: Context, name: str) -> MethodRun:
    """Run one method from scratch (its folder is cleared first: no stale checkpoint resumes)."""
    shutil.rmtree(ctx.out / name, ignore_errors=True)
    logger.info("seed %d: %s ...", ctx.seed, name)
    return METHODS[name](ctx)


def run_seed(out: Path, seed: int, profile: Profile, budget: Budget, methods: list[str]) -> None:
    """Every method on one seed's world; results made with the same world and budget are kept."""
    seed_dir = out / f"seed{seed}"
    world, key = _world(out, seed, profile)
    test = load_prompts(world.test_file)
    stamp = {"world": key, "budget": dataclasses.asdict(budget)}
    ref = _stored(seed_dir / "reference.json", stamp, "reference") or _save(
        seed_dir / "reference.json", reference_scores(world, test, budget), stamp
    )
    ctx = Context(world, seed_dir, seed, budget)
    for name in methods:
        done = _stored(seed_dir / f"{name}.json", stamp, name)
        if done is not None:
            segments = [Segment(**s) for s in done["segments"]]
            ctx.done[name] = MethodRun(done["model"], segments, done["samples"], done["notes"])
            continue
        started = time.perf_counter()
        run = ctx.done[name] = run_method(ctx, name)
        seconds = time.perf_counter() - started
        result = evaluate_method(ctx, name, run, ref, test, seconds)
        result["segments"] = [dataclasses.asdict(s) for s in run.segments]
        _save(seed_dir / f"{name}.json", result, stamp)
        norm = result["normalized"]["greedy"]["mean"]
        logger.info("seed %d: %s normalized %.3f in %.0f s", seed, name, norm, seconds)


def search_learning_rates(out: Path, profile: Profile, budget: Budget) -> dict[str, float]:
    """Pick each family's learning rate by the final dev score of one run per rate (seed 0)."""
    world, key = _world(out, 0, profile)
    dev_start = world.accuracy["base"]["dev"]
    dev_teachers = {d: world.accuracy[d]["dev"][d] for d in world.domains}
    chosen, rows = {}, []
    for family, method in LR_SEARCH.items():
        best = None
        for lr in profile.lr_grid:
            trial = dataclasses.replace(budget, lr=dict.fromkeys(budget.lr, lr))
            ctx = Context(world, out / "lr_search" / f"{family}_{lr:g}", 0, trial)
            stamp = {"world": key, "budget": dataclasses.asdict(trial)}
            record = _stored(ctx.out / "score.json", stamp, method)
            if record is None:
                logger.info("learning-rate search: %s at lr %g", method, lr)
                started = time.perf_counter()
                curve = normalized_curve(run_method(ctx, method).segments, dev_start, dev_teachers)
                seconds = time.perf_counter() - started
                record = {"final": curve[-1][1], "curve": curve, "seconds": seconds}
                _save(ctx.out / "score.json", record, stamp)
            rows.append(
                {
                    "family": family,
                    "method": method,
                    "lr": lr,
                    "dev": record["final"],
                    "seconds": record["seconds"],
                }
            )
            if best is None or record["final"] > best[0]:
                best = (record["final"], lr)
        chosen[family] = best[1]
    (out / "lr_search.json").write_text(json.dumps({"chosen": chosen, "trials": rows}, indent=2))
    return chosen


def _lr_override(text: str) -> tuple[str, float]:
    family, _, value = text.partition("=")
    if family not in LR_SEARCH or not value:
        raise SystemExit(f"--lr {text!r}: expected FAMILY=LR with FAMILY in {list(LR_SEARCH)}")
    return family, float(value)


def command_line(argv: list[str] | None) -> str:
    """How the table was asked for, as the docs quote it."""
    entry = ["python", "-m", "experiments.table"]
    return " ".join(shlex.quote(a) for a in [*entry, *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run the table (see the module docstring); returns 0."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Toy reproduction of the MOPD paper's table."
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument(
        "--world", choices=sorted(WORLDS), default="exact", help="the toy world's domains and "
        "teacher recipe (exact: add/rev/sort, SFT teachers; open: carry/spread/mix, teachers by "
        "a light SFT then GRPO)"
    )
    parser.add_argument("--out", default="runs/toy_table", help="runs and results")
    parser.add_argument(
        "--docs",
        default=None,
        help="where the table and plots go "
        "(default: docs/ for the full profile, <out>/docs otherwise)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, help="override the profile's steps per run")
    parser.add_argument(
        "--lr",
        nargs="*",
        default=[],
        metavar="FAMILY=LR",
        help="learning rate of a family (pg, grpo, sft), e.g. grpo=3e-5",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every process (the trainer and each engine): 1 avoids "
        "oversubscribing the cores that the trainer and its engines share",
    )
    parser.add_argument(
        "--lr-search", action="store_true", help="pick each family's learning rate on dev first"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    profile = PROFILES[args.profile]
    profile = dataclasses.replace(profile, world=world_settings(profile, args.world))
    budget = dataclasses.replace(
        profile.budget,
        steps=args.steps or profile.budget.steps,
        lr={**profile.budget.lr, **dict(_lr_override(x) for x in args.lr)},
    )
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()
    if args.lr_search:
        budget = dataclasses.replace(
            budget, lr={**budget.lr, **search_learning_rates(out, profile, budget)}
        )
    methods = [m for m in METHODS if m in args.methods]
    for seed in args.seeds:
        run_seed(out, seed, profile, budget, methods)
    invocation = {
        "command": command_line(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "minutes": (time.perf_counter() - started) / 60,
        "threads": args.threads,
        "load_start": load_at_start,
        "load_end": os.getloadavg(),
        "machine": machine(),
    }
    with open(out / "invocations.jsonl", "a") as f:
        f.write(json.dumps(invocation) + "\n")
    docs = Path(args.docs or ("docs" if args.profile == "full" else out / "docs"))
    write_docs(out, docs, args.seeds, methods, budget)
    print(f"table: {docs / 'toy_table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors("python -m experiments.table", main))
