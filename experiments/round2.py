"""Second MOPD round on the toy world: teachers re-derived from the round-1 MOPD student.

Consumes the round-1 student (HF folder) and a built toy world; produces one new teacher per
domain, each a copy of the round-1 student made with the world's own teacher recipe
(`toy_world.make_teacher`: SFT or GRPO on fresh examples, dev checks, best check kept) up to
a higher dev target. Round 2 then runs MOPD from the round-1 student
against these teachers, the MOPD paper's "iteration 2" (its teachers come from domain RL on
the round-1 student; here they come the way the toy world's round-1 teachers came).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd_megatron.data import load_prompts, tokenize_records
from mopd_megatron.demo.evaluate import evaluate
from mopd_megatron.demo.models import save_hf
from mopd_megatron.demo.settings import WorldSettings
from mopd_megatron.demo.tasks import ExampleStream
from mopd_megatron.demo.toy_world import World, make_teacher

logger = logging.getLogger(__name__)


def derive_teachers(
    student: str | Path, world: World, out_dir: str | Path, target: float, seed: int
) -> dict[str, dict]:
    """Fine-tune a copy of `student` per domain into that domain's round-2 teacher.

    Args:
        student: the round-1 MOPD student's HF folder.
        world: the toy world (dev/test prompts, the build's SFT settings).
        out_dir: teachers go to `<out_dir>/<domain>`.
        target: dev accuracy at which a teacher's SFT stops.
        seed: seed of the SFT example stream.

    Returns:
        {domain: {"path", "steps", "dev"}} (dev = the teacher's dev accuracy on its domain).
    """
    manifest = json.loads((world.root / "world.json").read_text())
    settings = dataclasses.replace(WorldSettings(**manifest["settings"]), teacher_target=target)
    tokenizer = AutoTokenizer.from_pretrained(str(student))
    base = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    dev = tokenize_records(load_prompts(world.dev_file), tokenizer)
    held_out = dev + load_prompts(world.test_file)
    stream = ExampleStream(held_out, seed)

    def score(model, records) -> dict[str, float]:
        return evaluate(
            model,
            records,
            tokenizer,
            batch_size=settings.eval_batch_size,
            max_new_tokens=world.max_new_tokens,
        )

    teachers = {}
    for domain in world.domains:
        teacher, steps = make_teacher(base, tokenizer, stream, score, dev, domain, settings)
        path = Path(out_dir) / domain
        save_hf(teacher, tokenizer, path)
        accuracy = score(teacher, [r for r in dev if r.domain == domain])[domain]
        teachers[domain] = {"path": str(path), "steps": steps, "dev": accuracy}
        logger.info("round-2 teacher %s: dev %.3f after %d training steps", domain, accuracy, steps)
    return teachers
