"""Toy world: builds, offline, everything the CPU demo distils with.

Produces, under one output folder:

    tokenizer/                  the 42-token character tokenizer
    data/{train,dev,test}.jsonl prompt files (data-module format; dev/test never trained on)
    base/                       the mediocre base student (HF folder, safetensors)
    base.json                   the base's settings key, steps and seconds (a rebuild whose
                                base settings are unchanged reuses it: teachers are cheaper)
    teachers/<domain>/          one teacher per domain (HF folders)
    world.json                  paths, settings, build times, and the greedy dev/test
                                accuracy of every model on every domain

The base is trained by `demo.curriculum` (closed-loop mixed SFT into the [0.15, 0.5] dev
band); each teacher, from its own example stream, by per-domain SFT (`demo.curriculum`), GRPO
with the domain's verifier (`demo.rl_teacher`), or a light SFT then GRPO, to dev >= 0.85, as
`WorldSettings.teacher_recipe` says (`make_teacher`). Deterministic given the settings
(seed included) and the thread count. A second build with the same settings reuses the
saved world: world.json, written last, records the settings' key.

Command line: `python -m mopd_megatron.demo.toy_world --out DIR [--world exact|open]
[--seed N] [--threads N]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from mopd_megatron.data import save_prompts, tokenize_records
from mopd_megatron.demo.curriculum import fmt, train_base, train_teacher
from mopd_megatron.demo.evaluate import evaluate
from mopd_megatron.demo.models import new_student, save_hf
from mopd_megatron.demo.rl_teacher import train_teacher_grpo
from mopd_megatron.demo.settings import WORLDS, WorldSettings
from mopd_megatron.demo.tasks import MAX_NEW_TOKENS, ExampleStream, make_splits, max_new_tokens
from mopd_megatron.demo.tokenizer import build_char_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class World:
    """A built toy world (absolute paths) as described by its world.json."""

    root: Path
    domains: list[str]
    tokenizer_path: Path
    train_file: Path
    dev_file: Path
    test_file: Path
    base_path: Path
    teacher_paths: dict[str, Path]
    """{domain: teacher HF folder}."""
    accuracy: dict[str, dict[str, dict[str, float]]]
    """{"base" or a teacher's domain: {"dev" | "test": {domain: greedy accuracy}}}."""
    max_new_tokens: int = MAX_NEW_TOKENS
    """Enough new tokens for every answer plus <eos>."""


def build_world(
    out_dir: str | Path, settings: WorldSettings | None = None, force: bool = False
) -> World:
    """Build the toy world under `out_dir`, or reuse the one saved there with the same settings.

    Args:
        out_dir: the world's folder.
        settings: sizes, seed and SFT schedules; the defaults are the measured ones.
        force: rebuild even when a matching world exists.

    Returns:
        The world (as `load_world(out_dir)` reads it).
    """
    settings = settings or WorldSettings()
    root = Path(out_dir).resolve()
    manifest = root / "world.json"
    if not force and _saved_key(manifest) == settings.key():
        logger.info("toy world: reusing %s (same settings)", root)
        return load_world(root)
    base_cached = not force and _saved_key(root / "base.json") == settings.base_key()
    for stale in ("world.json", "tokenizer", "data", "teachers", *([] if base_cached else
                                                                   ["base", "base.json"])):
        path = root / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    started = time.perf_counter()
    (root / "data").mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer(str(root / "tokenizer"))
    s = settings
    splits = make_splits(s.domains, s.seed, s.n_train, s.n_dev, s.n_test)
    for name, records in splits.items():
        save_prompts(records, root / "data" / f"{name}.jsonl")
    dev = tokenize_records(splits["dev"], tokenizer)
    test = tokenize_records(splits["test"], tokenizer)
    stream = ExampleStream(splits["dev"] + splits["test"], s.seed)
    limit = max_new_tokens(s.domains)

    def score(model, records) -> dict[str, float]:
        return evaluate(
            model, records, tokenizer, batch_size=s.eval_batch_size, max_new_tokens=limit
        )

    def entry(model, path: str, steps: int, since: float) -> dict:
        save_hf(model, tokenizer, root / path)
        seconds = round(time.perf_counter() - since, 1)
        return {
            "path": path,
            "steps": steps,
            "seconds": seconds,
            "dev": score(model, dev),
            "test": score(model, test),
        }

    if base_cached:
        base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        made = json.loads((root / "base.json").read_text())
        logger.info("toy world: reusing the base in %s (same base settings)", root / "base")
    else:
        since = time.perf_counter()
        base = new_student(tokenizer, s.seed)
        steps = train_base(base, tokenizer, stream, score, dev, s)
        save_hf(base, tokenizer, root / "base")
        made = {"key": s.base_key(), "steps": steps,
                "seconds": round(time.perf_counter() - since, 1)}
        (root / "base.json").write_text(json.dumps(made, indent=2) + "\n")
    models = {"base": {"path": "base", "steps": made["steps"], "seconds": made["seconds"],
                       "dev": score(base, dev), "test": score(base, test)}}
    for domain in s.domains:
        since = time.perf_counter()
        # SFT teachers keep the base's stream, so the exact world (the demo's, the published
        # table's) rebuilds as before; RL-made teachers each draw from their own.
        own = stream if s.teacher_recipe == "sft" else ExampleStream(
            splits["dev"] + splits["test"], f"{s.seed}:teacher:{domain}")
        teacher, steps = make_teacher(base, tokenizer, own, score, dev, domain, s)
        models[domain] = entry(teacher, f"teachers/{domain}", steps, since)
    seconds = time.perf_counter() - started
    world = {
        "key": s.key(),
        "settings": dataclasses.asdict(s),
        "domains": s.domains,
        "max_new_tokens": limit,
        "tokenizer": "tokenizer",
        "data": {name: f"data/{name}.jsonl" for name in splits},
        "base": "base",
        "teachers": {d: f"teachers/{d}" for d in s.domains},
        "models": models,
        "build_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (root / "world.json.tmp").write_text(json.dumps(world, indent=2) + "\n")
    (root / "world.json.tmp").replace(manifest)
    logger.info("toy world: built in %.0fs at %s", seconds, root)
    for name, info in models.items():
        steps, took = info["steps"], info["seconds"]
        logger.info("  %-5s test %s (%d steps, %.0fs)", name, fmt(info["test"]), steps, took)
    return load_world(root)


def make_teacher(base, tokenizer, stream, score, dev, domain: str, s: WorldSettings):
    """A teacher for `domain` made from `base` by `s.teacher_recipe`: `sft` (full-rate SFT),
    `grpo`, or `sft_grpo` (a light SFT at `light_lr` to `light_target`, then GRPO).

    Returns:
        (the teacher, its training steps in all).
    """
    if s.teacher_recipe == "sft":
        return train_teacher(base, tokenizer, stream, score, dev, domain, s)
    start, light_steps = base, 0
    if s.teacher_recipe == "sft_grpo":
        light = dataclasses.replace(s, lr=s.light_lr, teacher_target=s.light_target,
                                    teacher_max_steps=s.light_max_steps)
        start, light_steps = train_teacher(base, tokenizer, stream, score, dev, domain, light)
    teacher, steps = train_teacher_grpo(start, tokenizer, stream, score, dev, domain, s)
    return teacher, light_steps + steps


def load_world(out_dir: str | Path) -> World:
    """Read a built world's world.json (paths made absolute)."""
    root = Path(out_dir).resolve()
    manifest = json.loads((root / "world.json").read_text())
    return World(
        root=root,
        domains=manifest["domains"],
        tokenizer_path=root / manifest["tokenizer"],
        train_file=root / manifest["data"]["train"],
        dev_file=root / manifest["data"]["dev"],
        test_file=root / manifest["data"]["test"],
        base_path=root / manifest["base"],
        teacher_paths={d: root / p for d, p in manifest["teachers"].items()},
        accuracy={
            name: {split: m[split] for split in ("dev", "test")}
            for name, m in manifest["models"].items()
        },
        max_new_tokens=manifest["max_new_tokens"],
    )


def _saved_key(manifest: Path) -> str | None:
    try:
        return json.loads(manifest.read_text()).get("key")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> None:
    """Build a world from the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Build the CPU demo's toy world.")
    parser.add_argument("--out", required=True, help="world folder")
    parser.add_argument("--world", choices=sorted(WORLDS), default="exact", help="named world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--domains", help="comma-separated domains (default: the world's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    world = dict(WORLDS[args.world], seed=args.seed)
    if args.domains:
        world["domains"] = args.domains.split(",")
    build_world(args.out, WorldSettings(**world), args.force)


if __name__ == "__main__":
    main()
