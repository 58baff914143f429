"""The MOPD training loop (DESIGN.md §1), one call per stage.

    recipe → student (Megatron, HF weights) → rollout engine + domain teachers
    each step: prompts → rollout → teacher scores + verifier rewards → batch (advantages,
               IcePop inputs) → Megatron step → weight sync → log → checkpoint
    end: held-out evaluation (student and teachers), HF export, report.

Every rank runs the Megatron parts; global rank 0 also owns the engines and the HTTP traffic
and broadcasts each step's trajectories (small: token ids and a few floats per token).
Sampling is seeded per step, so a run resumed from a checkpoint draws what the original drew.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state
from transformers import AutoTokenizer

from .collect import RolloutSettings, collect_trajectories
from .config import Recipe, to_dict
from .data import DomainMixSampler, load_prompts, tokenize_records
from .hf.convert import HF_CONFIG_DIR, save_hf_checkpoint
from .hf.safetensors_io import copy_hf_metadata
from .hf.spec import read_hf_config
from .mopd.batch import build_batch
from .mopd.losses import mopd_loss
from .rollout.transport import run_sync
from .rollout.types import SamplingParams
from .serving import start_serving
from .student.checkpoint import load_checkpoint, save_checkpoint
from .student.local_teacher import LocalTeachers
from .student.model import build_student
from .student.optimizer import setup_optimizer
from .student.parallel import init_parallel, teardown_parallel
from .student.train_step import slice_for_data_parallel, train_step
from .summary import step_scalars, write_final_report
from .sync.student import probe_sync_gap, push_student_weights
from .teachers import teacher_for
from .tracking import RunTracker

PROBE_SEQUENCES = 4
"""Sequences of each step's batch on which the engine/trainer log-prob gap is measured."""


def _broadcast(obj):
    """Send a picklable object from global rank 0 to every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _records(files, tokenizer, chat):
    return tokenize_records(load_prompts(files), tokenizer, chat) if files else []


def train(recipe: Recipe) -> Path:
    """Run MOPD as the recipe says; returns the run directory (report.md inside)."""
    started = time.perf_counter()
    spec = read_hf_config(recipe.model.hf_path)
    info = init_parallel(recipe.parallel, recipe.train.seed, spec, recipe.source)
    leader = info.rank == 0
    run_dir = Path(recipe.logging.dir)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.hf_path)
    model, spec = build_student(recipe.model.hf_path, recipe.model, recipe.parallel)
    model, optimizer, scheduler = setup_optimizer(model, recipe.optimizer, recipe.train.steps)

    chat = recipe.data.apply_chat_template
    train_records = _records(recipe.data.train_files, tokenizer, chat)
    eval_records = _records(recipe.data.eval_files, tokenizer, chat)
    domains = sorted({r.domain for r in train_records + eval_records})
    sampler = DomainMixSampler(train_records, recipe.data.prompts_per_step,
                               recipe.data.domain_weights, recipe.train.seed)
    ckpt = recipe.checkpoint
    ckpt_root = Path(ckpt.dir or run_dir / "checkpoints")
    if leader:  # makes every iter_*/ convertible with `mopd-megatron convert megatron-to-hf`
        copy_hf_metadata(recipe.model.hf_path, ckpt_root / HF_CONFIG_DIR)
    resumed = load_checkpoint(ckpt_root, model, optimizer, scheduler) if ckpt.resume else None
    start_step = resumed["step"] if resumed else 0
    before = resumed.get("before") if resumed else None
    if resumed:
        sampler.load_state_dict(resumed["sampler"])

    a, r = recipe.algorithm, recipe.rollout
    loss_fn = partial(
        mopd_loss, cfg=a, tp_group=parallel_state.get_tensor_model_parallel_group(),
        vocab_size=spec.vocab_size, temperature=r.temperature, num_domains=len(domains),
    )
    if a.loss in ("full_rkl", "forward_kl"):  # teacher logits at the student's layout
        paths = {i: teacher_for(recipe.teachers, d).model_path for i, d in enumerate(domains)}
        loss_fn = LocalTeachers(paths, recipe.model, recipe.parallel).wrap(loss_fn)
    sampling = SamplingParams(r.temperature, r.top_p, r.top_k, r.max_new_tokens)
    # A top-k at least the vocabulary is the whole teacher distribution (exact reverse KL).
    teacher_top_k = min(a.topk, spec.vocab_size) if a.loss == "topk" else 0
    tracker = RunTracker(run_dir, recipe.train.steps, tensorboard=recipe.logging.tensorboard,
                         enabled=leader, start_step=start_step)
    with ExitStack() as stack:
        serving = stack.enter_context(start_serving(recipe, run_dir)) if leader else None
        weight_sync = serving.weight_sync if leader else None
        if start_step:  # the engine started from the HF weights; give it the resumed ones
            push_student_weights(model, spec, weight_sync, str(start_step))

        def evaluate():
            return serving.evaluate(tokenizer, eval_records, r.max_new_tokens) if leader else None

        before = _broadcast(evaluate()) if not start_step else before
        for step in range(start_step + 1, recipe.train.steps + 1):
            t0 = time.perf_counter()
            records = sampler.next_batch()
            settings = RolloutSettings(
                sampling=replace(sampling, sampling_seed=(recipe.train.seed << 40) + (step << 20)),
                n_samples_per_prompt=r.n_samples_per_prompt, chunk_size=r.batch_size,
                teacher_top_k=teacher_top_k, use_teachers=a.loss != "grpo",
            )
            collected = collect_trajectories(
                serving.rollout, serving.teachers, tokenizer, records, settings
            ) if leader else None
            trajectories = _broadcast(run_sync(collected) if leader else None)
            t1 = time.perf_counter()
            batch = build_batch(trajectories, pad_id=tokenizer.pad_token_id, domains=domains,
                                topk=teacher_top_k)
            metrics = train_step(model, optimizer, scheduler, slice_for_data_parallel(batch),
                                 loss_fn, recipe.parallel.micro_batch_size)
            t2 = time.perf_counter()
            push_student_weights(model, spec, weight_sync, str(step))
            gap = None
            if r.sync_check:
                length = min(len(t.token_ids) for t in trajectories[:PROBE_SEQUENCES])
                probe = batch["tokens"][:PROBE_SEQUENCES, :length]
                gap = probe_sync_gap(model, spec, serving.rollout if leader else None, probe)
            times = {"rollout": t1 - t0, "train": t2 - t1, "sync": time.perf_counter() - t2}
            scalars = step_scalars(metrics, trajectories, domains, times, gap)
            if recipe.logging.eval_interval and step % recipe.logging.eval_interval == 0:
                scalars.update({f"eval/{d}": v for d, v in (evaluate() or {}).items()})
            tracker.log(step, scalars, ("loss", "kl/mean", "reward/mean", "icepop/gated"))
            if step % ckpt.save_interval == 0 or step == recipe.train.steps:
                extra = {"step": step, "sampler": sampler.state_dict(), "before": before,
                         "recipe": to_dict(recipe)}
                save_checkpoint(ckpt_root, step, model, optimizer, scheduler, extra, ckpt.keep_last)
        after = evaluate()
        hf_dir = ckpt_root / "hf" if ckpt.export_hf else None
        if hf_dir is not None:
            save_hf_checkpoint(model, spec, hf_dir, recipe.model.hf_path)
        if leader:
            teachers = serving.evaluate_teachers(tokenizer, eval_records, r.max_new_tokens)
            report = write_final_report(run_dir, recipe, before, after, teachers, hf_dir,
                                        time.perf_counter() - started)
            print(f"report: {report}", flush=True)
    tracker.close()
    teardown_parallel()
    return run_dir

