"""Off-policy finetune (RFT) baseline: verified teacher samples -> SFT of the student.

1. Sampling (global rank 0): start the recipe's teachers, draw `prompts` prompts with the
   recipe's domain mix (`data.domain_weights`), sample `rollout.n_samples_per_prompt`
   responses per prompt from the prompt's domain teacher (rollout temperature, top-p/k,
   length), keep the distinct finished responses the verifier scores 1. Counts per domain
   go to `rft.json`.
2. SFT (every rank, the recipe's layout): fine-tune the student from `model.hf_path` on the
   kept samples for `train.steps` steps of `data.prompts_per_step` sequences with the token
   mean cross-entropy (`baselines.sft`), `optimizer.*` as for MOPD. Every
   `logging.eval_interval` steps the weights are pushed to a rollout engine and scored
   greedily on `data.eval_files`, as the MOPD loop does.

Writes what `mopd-megatron train` writes: history.jsonl (loss, eval/<domain>), scores.json,
report.md, checkpoints/hf (the final student).

Command line (it starts torchrun itself when the recipe's layout needs several ranks):
    mopd-megatron baseline rft RECIPE --prompts N [key=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from transformers import AutoTokenizer

from mopd_megatron.baselines.sft import EpochBatches
from mopd_megatron.collect import evaluate_engine
from mopd_megatron.config import Recipe, load_recipe
from mopd_megatron.data import DomainMixSampler, PromptRecord
from mopd_megatron.data.prompt_set import load_prompt_set
from mopd_megatron.launch.local import needs_relaunch, relaunch_under_torchrun
from mopd_megatron.mopd.batch import build_batch
from mopd_megatron.mopd.objectives import SupervisedFineTuning
from mopd_megatron.mopd.rewards import score_batch
from mopd_megatron.report import normalized_scores, write_report
from mopd_megatron.rollout.sglang import start_engine
from mopd_megatron.rollout.transport import run_sync
from mopd_megatron.rollout.types import SamplingParams
from mopd_megatron.sources import broadcast_from_leader
from mopd_megatron.student.student import Student
from mopd_megatron.sync import make_weight_sync
from mopd_megatron.teachers import TeacherPool
from mopd_megatron.tracking import RunTracker
from mopd_megatron.trajectory import Trajectory

logger = logging.getLogger(__name__)

STAT_KEYS = ("prompts", "drawn", "correct", "kept")
"""Per-domain counts of the sampling stage: prompts, responses drawn, verified, kept."""


async def sample_verified(
    pool: TeacherPool, tokenizer, records: list[PromptRecord], n: int, sampling: SamplingParams
) -> tuple[list[Trajectory], dict[str, dict[str, int]]]:
    """Sample n responses per prompt from its domain teacher; keep distinct verified ones.

    Args:
        pool: the started teachers.
        tokenizer: the shared tokenizer (to decode responses for the verifiers).
        records: prompts with `prompt_ids`.
        n: samples per prompt.
        sampling: the sampling settings (with a seed for reproducibility).

    Returns:
        (kept trajectories, {domain: {"prompts", "drawn", "correct", "kept"}}).
    """
    routed: dict[str, list[PromptRecord]] = {}
    for record in records:
        routed.setdefault(pool.route(record.domain), []).append(record)

    async def draw(name: str, own: list[PromptRecord]):
        expanded = [r for r in own for _ in range(n)]
        gens = await pool.client(name).agenerate([r.prompt_ids for r in expanded], sampling)
        texts = tokenizer.batch_decode([g.output_ids for g in gens], skip_special_tokens=True)
        return expanded, gens, await asyncio.to_thread(score_batch, expanded, texts)

    kept, seen, stats = [], set(), {}
    for expanded, gens, rewards in await asyncio.gather(*(draw(*kv) for kv in routed.items())):
        for record, gen, reward in zip(expanded, gens, rewards):
            count = stats.setdefault(record.domain, dict.fromkeys(STAT_KEYS, 0))
            count["drawn"] += 1
            key = (tuple(gen.prompt_ids), tuple(gen.output_ids))
            if reward < 1.0 or gen.finish_reason != "stop":
                continue
            count["correct"] += 1
            if key not in seen:
                seen.add(key)
                count["kept"] += 1
                kept.append(
                    Trajectory.single_turn(
                        gen.prompt_ids,
                        gen.output_ids,
                        gen.output_logprobs,
                        domain=record.domain,
                        group=len(kept),
                        reward=reward,
                        finish_reason=gen.finish_reason,
                    )
                )
    for record in records:
        stats[record.domain]["prompts"] += 1
    return kept, dict(sorted(stats.items()))


def _sample_teachers(recipe: Recipe, tokenizer, train, evals, prompts: int, run_dir: Path):
    """Stage 1 on the leader: verified samples, their counts, and the teachers' accuracy."""
    r = recipe.rollout
    sampler = DomainMixSampler(train, prompts, recipe.data.domain_weights, recipe.train.seed)
    sampling = SamplingParams(
        r.temperature, r.top_p, r.top_k, r.max_new_tokens, sampling_seed=recipe.train.seed << 40
    )
    with TeacherPool.start(recipe.teachers, recipe.model.hf_path, run_dir / "logs") as pool:
        kept, stats = run_sync(
            sample_verified(pool, tokenizer, sampler.next_batch(), r.n_samples_per_prompt, sampling)
        )
        teachers = {}
        for name in pool.names if evals else []:
            own = [x for x in evals if pool.route(x.domain) == name]
            teachers.update(
                run_sync(evaluate_engine(pool.client(name), tokenizer, own, r.max_new_tokens))
            )
    return kept, stats, teachers


def run_rft(recipe: Recipe, prompts: int) -> Path:
    """Run both stages as the module docstring says; returns the run directory."""
    started = time.perf_counter()
    run_dir = Path(recipe.logging.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.hf_path)
    data = load_prompt_set(recipe.data, tokenizer, recipe.train.seed)
    train, evals, domains = data.train, data.held_out, data.domains
    student = Student.build(recipe)
    leader = student.is_leader
    found = _sample_teachers(recipe, tokenizer, train, evals, prompts, run_dir) if leader else None
    kept, stats, teachers = broadcast_from_leader(found)
    if leader:
        (run_dir / "rft.json").write_text(
            json.dumps({"prompts": prompts, "samples": stats}, indent=2)
        )
    loss_fn = SupervisedFineTuning(recipe.algorithm, student.loss_context(len(domains)))
    r, steps = recipe.rollout, recipe.train.steps if kept else 0
    if not kept:
        logger.warning("rft: no teacher sample was verified; the student is not fine-tuned")
    batches = EpochBatches(kept, recipe.data.prompts_per_step, recipe.train.seed) if kept else None
    tracker = RunTracker(run_dir, steps, tensorboard=recipe.logging.tensorboard, enabled=leader)
    with ExitStack() as stack:
        engine = (
            stack.enter_context(
                start_engine(r, recipe.model.hf_path, run_dir / "logs", name="rollout")
            )
            if leader and evals
            else None
        )
        sync = (
            make_weight_sync(r, engine.client, template_dir=recipe.model.hf_path, work_dir=run_dir)
            if engine
            else None
        )

        def evaluate(version: str | None) -> dict | None:
            if version is not None:
                student.push_weights(sync, version)
            return (
                run_sync(evaluate_engine(engine.client, tokenizer, evals, r.max_new_tokens))
                if engine
                else None
            )

        before = evaluate(None) if evals else None
        for step in range(1, steps + 1):
            batch = build_batch(batches.next_batch(), pad_id=tokenizer.pad_token_id,
                                domains=domains)
            metrics = student.step(batch, loss_fn)
            scalars = {k: metrics[k] for k in ("loss", "grad_norm", "lr")}
            if evals and recipe.logging.eval_interval and step % recipe.logging.eval_interval == 0:
                scalars.update({f"eval/{d}": v for d, v in (evaluate(str(step)) or {}).items()})
            tracker.log(step, scalars, ("loss",))
        after = evaluate(str(steps)) if evals else None
        student.export_hf(recipe.hf_export_dir)
    if leader and after:
        _write_report(
            run_dir, recipe, before, teachers, after, stats, prompts, time.perf_counter() - started
        )
    tracker.close()
    student.close()
    return run_dir


def _write_report(run_dir, recipe, before, teachers, after, stats, prompts, seconds) -> None:
    scores = {"student before": before, "domain teacher": teachers, "student after": after}
    scores = {k: v for k, v in scores.items() if v and set(v) >= set(after)}
    normalized = normalized_scores(before, teachers, after) if len(scores) == 3 else None
    (run_dir / "scores.json").write_text(
        json.dumps({"scores": scores, "normalized": normalized}, indent=2)
    )
    drawn = sum(s["drawn"] for s in stats.values())
    kept = sum(s["kept"] for s in stats.values())
    steps = recipe.train.steps if kept else 0
    facts = {
        "recipe": recipe.source,
        "student": recipe.model.hf_path,
        "teacher samples": f"{prompts} prompts x {recipe.rollout.n_samples_per_prompt} = "
        f"{drawn}; kept {kept} distinct verified",
        "SFT": f"{steps} steps x {recipe.data.prompts_per_step} sequences, "
        f"lr {recipe.optimizer.lr}",
        "wall time": f"{seconds / 60:.1f} min",
    }
    write_report(
        run_dir,
        title="RFT (off-policy finetune): held-out accuracy per domain",
        scores=scores,
        normalized=normalized,
        facts=facts,
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`mopd-megatron baseline rft RECIPE --prompts N [key=value ...]`."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a MOPD recipe (student, teachers, data, optimizer)")
    parser.add_argument(
        "--prompts",
        type=int,
        required=True,
        help="prompts to sample teacher responses for (x n_samples_per_prompt)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides")
    args = parser.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if needs_relaunch(recipe.parallel.nproc):
        argv = sys.argv[1:] if argv is None else argv
        return relaunch_under_torchrun(recipe.parallel.nproc, "mopd_megatron.baselines.rft", argv)
    run_rft(recipe, args.prompts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
