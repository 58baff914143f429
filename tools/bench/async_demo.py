"""Benchmark: the CPU demo with the rollout synchronous (max_staleness 0) and ahead (1).

Builds (or reuses) the demo's toy world once, trains on it at each staleness one after the
other with the same recipe, and prints for each run the loop's steps per minute (steps over
the seconds the loop spent getting trajectories, training and syncing: start-up, evaluation
and checkpoints excluded; wall-clock minutes beside it), the mean staleness trained on, and
the final normalized score per domain ((after − before) / (teacher − before)), then the
steps-per-minute ratio.

    python tools/bench/async_demo.py --out runs/async_bench --steps 40 [--quick | --world DIR]

Not a test: on a 2-core CPU the engines and the trainer share the cores, so overlap gains
little; the planner (`mopd-megatron plan RECIPE`) gives the cluster-scale idle times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from mopd_megatron.config import edit_recipe, load_recipe, save_recipe
from mopd_megatron.demo.run import LAYOUTS, QUICK_RUN, QUICK_WORLD, RECIPE, world_recipe
from mopd_megatron.demo.settings import WorldSettings
from mopd_megatron.demo.toy_world import build_world, load_world

LOOP_TIMES = ("time/rollout", "time/train", "time/sync")


def summarize(run_dir: Path, wall_s: float) -> dict:
    """Steps per minute, staleness and normalized scores of one finished run."""
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    loop_s = sum(row[key] for row in rows for key in LOOP_TIMES)
    scores = json.loads((run_dir / "scores.json").read_text())
    return {
        "steps": len(rows),
        "steps_per_min": 60 * len(rows) / loop_s,
        "wall_min": wall_s / 60,
        "staleness": sum(row.get("async/staleness", 0.0) for row in rows) / len(rows),
        "normalized": scores["normalized"],
        "after": scores["scores"]["student after"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/async_bench")
    parser.add_argument("--steps", type=int, default=0, help="train.steps (0 = the recipe's)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="ep2")
    parser.add_argument("--quick", action="store_true", help="the demo's small world and run")
    parser.add_argument("--world", help="an existing toy world folder (default: build one)")
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    out = Path(args.out).resolve()
    settings = WorldSettings(**QUICK_WORLD) if args.quick else WorldSettings()
    world = load_world(args.world) if args.world else build_world(out / "world", settings)
    results = {}
    for k in args.staleness:
        run_dir = out / f"staleness_{k}"
        recipe = edit_recipe(world_recipe(load_recipe(RECIPE), world, run_dir),
                             parallel=LAYOUTS[args.layout])
        if args.quick:
            recipe = edit_recipe(recipe, **QUICK_RUN)
        path = save_recipe(recipe, out / f"recipe_staleness_{k}.yaml")
        # No checkpoint or evaluation inside the loop: the rollout ahead would overlap them,
        # which the loop's step times (synchronous: rollout + train + sync) do not count.
        overrides = [f"rollout.max_staleness={k}", "checkpoint.save_interval=1000000",
                     "logging.eval_interval=0"]
        if args.steps:
            overrides.append(f"train.steps={args.steps}")
        started = time.perf_counter()
        code = subprocess.call([sys.executable, "-m", "mopd_megatron.cli", "train", str(path),
                                *overrides])
        if code:
            print(f"staleness {k}: training failed (exit {code})")
            return code
        results[k] = summarize(run_dir, time.perf_counter() - started)
    print("\n| max_staleness | steps | steps/min (loop) | wall min | mean staleness | "
          "normalized score per domain |")
    print("|---:|---:|---:|---:|---:|---|")
    for k, r in results.items():
        scores = ", ".join(f"{d} {v:.3f}" for d, v in r["normalized"].items())
        print(f"| {k} | {r['steps']} | {r['steps_per_min']:.2f} | {r['wall_min']:.1f} | "
              f"{r['staleness']:.2f} | {scores} |")
    base, *others = args.staleness
    for k in others:
        ratio = results[k]["steps_per_min"] / results[base]["steps_per_min"]
        print(f"steps/min ratio, staleness {k} / {base}: {ratio:.2f}")
    (out / "async_bench.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
