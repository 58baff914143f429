"""A trajectory source of verified teacher samples: off-policy fine-tuning (RFT) through `train`.

`rollout.source: teacher_samples` with `algorithm.loss: sft`. Rank 0 draws
`rollout.teacher_sample_prompts` prompts with the recipe's domain mix, samples
`rollout.n_samples_per_prompt` responses per prompt from the prompt's domain teacher (rollout
temperature, top-p/k, length), and keeps the distinct finished responses its verifier scores 1
(counts per domain in `<run>/teacher_samples.json`). Every rank then gets the same pool, and
each step trains on the next `data.prompts_per_step` of them, reshuffled every epoch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from pathlib import Path

from .config import Recipe
from .data import DomainMixSampler, PromptRecord
from .mopd.rewards import score_batch
from .rollout.transport import run_sync
from .rollout.types import SamplingParams
from .sources import broadcast_from_leader, step_sampling
from .trajectory import Trajectory

logger = logging.getLogger(__name__)

STAT_KEYS = ("prompts", "drawn", "correct", "kept")
"""Per-domain counts of the sampling: prompts, responses drawn, verified, kept."""


async def sample_verified(
    pool, tokenizer, records: list[PromptRecord], n: int, sampling: SamplingParams
) -> tuple[list[Trajectory], dict[str, dict[str, int]]]:
    """Sample n responses per prompt from its domain teacher; keep distinct verified ones.

    Args:
        pool: the started teachers (`TeacherPool`).
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
                kept.append(Trajectory.single_turn(
                    gen.prompt_ids, gen.output_ids, gen.output_logprobs, domain=record.domain,
                    group=len(kept), reward=reward, finish_reason=gen.finish_reason))
    for record in records:
        stats[record.domain]["prompts"] += 1
    return kept, dict(sorted(stats.items()))


class EpochBatches:
    """Batches of `size` items from a pool, reshuffled every epoch (deterministic by seed)."""

    def __init__(self, items: list, size: int, seed: int):
        if not items:
            raise ValueError("no items to fine-tune on")
        self.items, self.size, self.seed = items, size, seed
        self.epoch, self.order, self.position = 0, self._order(0), 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list:
        """The next `size` items (crossing into the next epoch when the pool runs out)."""
        batch = []
        while len(batch) < self.size:
            if self.position == len(self.order):
                self.epoch += 1
                self.order, self.position = self._order(self.epoch), 0
            batch.append(self.items[self.order[self.position]])
            self.position += 1
        return batch


class TeacherSamples:
    """The verified-teacher-sample source (see the module docstring); collective."""

    def __init__(self, serving, tokenizer, train_records: list[PromptRecord], recipe: Recipe):
        pool = None
        if serving.teachers is not None:
            pool = self._sample(serving.teachers, tokenizer, train_records, recipe)
        kept, self.stats = broadcast_from_leader(pool)
        self.batches = None
        if kept:
            self.batches = EpochBatches(kept, recipe.data.prompts_per_step, recipe.train.seed)
        else:
            drawn = sum(s["drawn"] for s in self.stats.values())
            logger.warning("rollout.source teacher_samples: none of the %d teacher samples was "
                           "verified; the student is not fine-tuned", drawn)

    @staticmethod
    def _sample(pool, tokenizer, records, recipe: Recipe):
        r = recipe.rollout
        prompts = r.teacher_sample_prompts or len(records)
        sampler = DomainMixSampler(records, prompts, recipe.data.domain_weights, recipe.train.seed)
        kept, stats = run_sync(sample_verified(pool, tokenizer, sampler.next_batch(),
                                               r.n_samples_per_prompt, step_sampling(recipe, 0)))
        path = Path(recipe.logging.dir) / "teacher_samples.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"prompts": prompts, "samples": stats}, indent=2))
        return kept, stats

    def next(self, step: int) -> list[Trajectory]:
        """The step's batch; empty when no sample was verified (the loop then skips it)."""
        return self.batches.next_batch() if self.batches else []
