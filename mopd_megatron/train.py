"""The MOPD training loop (DESIGN.md §1), one call per stage.

    recipe → prompts → student (Megatron, HF weights) → objective → engines + teachers
    each step: trajectories (rollout, teacher scores, verifier rewards) → batch (advantages,
               IcePop inputs) → Megatron step → weight sync → log → checkpoint
    end: held-out evaluation (student and teachers), HF export, report.

Every rank runs this code. Global rank 0 owns the engines; elsewhere the serving side is
`NoServing` and the trajectory source broadcasts rank 0's trajectories (token ids and a few
floats per token). Sampling is seeded per step, so a resumed run draws what the original drew.
With `rollout.max_staleness` k > 0, rank 0 samples and scores up to k steps ahead while the
student trains (`async_rollout.py`); k = 0 is the synchronous loop above.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

from transformers import AutoTokenizer

from .async_rollout import AsyncSource
from .config import Recipe, to_dict
from .data.prompt_set import load_prompt_set
from .mopd.batch import build_batch
from .mopd.objectives import build_objective
from .serving import prepare_environments, start_serving
from .sources import OnPolicySource, SavedTrajectories, broadcast_from_leader
from .student.local_teacher import LocalTeachers
from .student.student import Student
from .student.teacher_heads import TeacherHeads
from .summary import step_scalars, write_final_report
from .teacher_samples import TeacherSamples
from .teachers import teacher_for
from .tracking import RunTracker

PROBE_SEQUENCES = 4
"""Sequences of each step's batch on which the engine/trainer log-prob gap is measured."""


def build_loss(recipe: Recipe, student: Student, domains: list[str]):
    """(the loss `Student.step` calls, the recipe's objective). Full-vocabulary KL attaches
    teacher logits at the student's layout to each micro-batch: from served teachers' hidden
    states through their LM-head shards, or from teacher models run locally."""
    objective = build_objective(recipe.algorithm, student.loss_context(len(domains)))
    if objective.needs.teacher_hidden_states:  # served teachers: only their LM-head shards here
        heads = TeacherHeads.from_recipe(recipe, domains, student.spec.vocab_size)
        return heads.wrap(objective), objective
    if not objective.needs.local_teacher_logits:
        return objective, objective
    paths = {i: teacher_for(recipe.teachers, d).model_path for i, d in enumerate(domains)}
    return LocalTeachers(paths, recipe.model, recipe.parallel).wrap(objective), objective


def trajectory_source(recipe: Recipe, serving, tokenizer, prompts, objective, train_only):
    """Saved dumps (`--train-only`), verified teacher samples (RFT) or on-policy sampling."""
    if train_only:
        return SavedTrajectories(train_only)
    if recipe.rollout.source == "teacher_samples":
        return TeacherSamples(serving, tokenizer, prompts.train, recipe)
    return OnPolicySource(serving, tokenizer, prompts.sampler, recipe, objective.needs)


def train(recipe: Recipe, train_only: str | Path | None = None) -> Path:
    """Run MOPD as the recipe says; returns the run directory (report.md inside).
    `train_only`: a folder a `--rollout-only` run filled; no engines start (no sync, no eval)."""
    started = time.perf_counter()
    run_dir, ckpt_root, r = Path(recipe.logging.dir), recipe.checkpoint_root, recipe.rollout
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.hf_path)
    prompts = load_prompt_set(recipe.data, tokenizer, recipe.train.seed)  # before any model
    prepare_environments(recipe, prompts.train + prompts.held_out)
    student = Student.build(recipe)
    loss, objective = build_loss(recipe, student, prompts.domains)
    resumed = student.load(ckpt_root) if recipe.checkpoint.resume else None
    start_step = resumed["step"] if resumed else 0
    if resumed:
        prompts.sampler.load_state_dict(resumed["sampler"])
    tracker = RunTracker(run_dir, recipe.train.steps, tensorboard=recipe.logging.tensorboard,
                         enabled=student.is_leader, start_step=start_step)
    with ExitStack() as stack:
        serving = stack.enter_context(
            start_serving(recipe, run_dir, owner=student.is_leader and not train_only))
        source = trajectory_source(recipe, serving, tokenizer, prompts, objective, train_only)
        if start_step:  # the engine started from the HF weights; give it the resumed ones
            student.push_weights(serving.weight_sync, str(start_step))

        def evaluate():
            return serving.evaluate(tokenizer, prompts.held_out, r.max_new_tokens)

        # every rank keeps the scores: each saves them in its checkpoint's common state
        before = resumed.get("before") if resumed else broadcast_from_leader(evaluate())
        ahead = None
        if isinstance(source, OnPolicySource):  # sampling runs ahead of training (k >= 0)
            source = ahead = stack.enter_context(AsyncSource(
                source, r, recipe.train.steps, start_step=start_step, leader=student.is_leader,
                state=resumed.get("rollout_queue") if resumed else None))
        for step in range(start_step + 1, recipe.train.steps + 1):
            t0 = time.perf_counter()
            trajectories = source.next(step)
            if not trajectories:  # nothing to learn from this step (e.g. no verified sample)
                continue
            t1 = time.perf_counter()
            batch = build_batch(trajectories, pad_id=tokenizer.pad_token_id,
                                domains=prompts.domains, topk=objective.needs.topk_width)
            metrics = student.step(batch, loss)
            t2 = time.perf_counter()
            gap, evals, t3 = None, None, None
            if not train_only:  # a train-only run has no engine to sync or probe
                with ahead.engine_turn(step) if ahead else nullcontext():  # no rollout meanwhile
                    student.push_weights(serving.weight_sync, str(step))
                    if r.sync_check:
                        length = min(len(t.token_ids) for t in trajectories[:PROBE_SEQUENCES])
                        probe = batch["tokens"][:PROBE_SEQUENCES, :length]
                        gap = student.probe_gap(serving.rollout, probe)
                    t3 = time.perf_counter()
                    if recipe.logging.eval_interval and step % recipe.logging.eval_interval == 0:
                        evals = evaluate()
            times = {"rollout": t1 - t0, "train": t2 - t1, "sync": (t3 or time.perf_counter()) - t2}
            scalars = step_scalars(metrics, trajectories, prompts.domains, times, gap)
            scalars.update(ahead.scalars(step) if ahead else {})
            scalars.update({f"eval/{d}": v for d, v in (evals or {}).items()})
            tracker.log(step, scalars, ("loss", "kl/mean", "reward/mean", "icepop/gated"))
            if step % recipe.checkpoint.save_interval == 0 or step == recipe.train.steps:
                extra = {"step": step, "sampler": prompts.sampler.state_dict(), "before": before,
                         "recipe": to_dict(recipe)}
                if ahead:  # the batches sampled ahead and rank 0's sampler after them
                    extra["rollout_queue"] = ahead.state_dict()
                    extra["sampler"] = extra["rollout_queue"]["sampler"]
                student.save(ckpt_root, step, extra, recipe.checkpoint.keep_last)
        if ahead:
            ahead.close()  # the producer leaves the engine to the final evaluation
        after = evaluate()
        hf_dir = student.export_hf(recipe.hf_export_dir) if recipe.checkpoint.export_hf else None
        teachers = serving.evaluate_teachers(tokenizer, prompts.held_out, r.max_new_tokens)
        report = write_final_report(run_dir, recipe, objective_name=objective.name,
                                    before=before, after=after, teacher_scores=teachers,
                                    hf_dir=hf_dir, wall_seconds=time.perf_counter() - started)
        if report:
            print(f"report: {report}", flush=True)
    tracker.close()
    student.close()
    return run_dir
