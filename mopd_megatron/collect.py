"""The rollout phase of one MOPD step: prompts -> scored trajectories.

    prompts ──rollout engine──▶ n responses each (+ μθ per token)
            ──domain teacher──▶ log π_T of every response token (+ top-k)
            ──verifier───────▶ outcome reward

Runs on the rank that owns the engines (global rank 0). Generation goes out in request-sized
chunks and each chunk is sent to its teachers as soon as it comes back, so teacher
prefill overlaps the sampling of the next chunks. Evaluation uses the same engines greedily.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .data import PromptRecord
from .mopd.rewards import score_batch
from .rollout.types import Generation, SamplingParams
from .trajectory import Trajectory


@dataclass
class RolloutSettings:
    sampling: SamplingParams
    n_samples_per_prompt: int
    chunk_size: int
    """Prompts per generation chunk (the unit of overlap with teacher scoring)."""
    teacher_top_k: int
    use_teachers: bool = True
    """False for the outcome-only (GRPO) baselines: no teacher is asked to score."""


def _trajectory(gen: Generation, record: PromptRecord, group: int) -> Trajectory:
    return Trajectory.single_turn(
        gen.prompt_ids, gen.output_ids, gen.output_logprobs, domain=record.domain, group=group,
        reward=0.0, finish_reason=gen.finish_reason,
    )


async def _collect_chunk(engine, teachers, tokenizer, records, groups, settings) -> list:
    prompts = [r.prompt_ids for r in records]
    generations = await engine.agenerate(prompts, settings.sampling)
    texts = tokenizer.batch_decode([g.output_ids for g in generations], skip_special_tokens=True)
    trajectories = [_trajectory(g, r, grp) for g, r, grp in zip(generations, records, groups)]
    jobs = [asyncio.to_thread(score_batch, records, texts)]  # verifiers beside the teachers
    if settings.use_teachers:
        jobs.append(teachers.ascore(
            [t.token_ids for t in trajectories],
            [t.response_start for t in trajectories],
            [t.domain for t in trajectories],
            top_k=settings.teacher_top_k,
        ))
    rewards, *teacher_scores = await asyncio.gather(*jobs)
    for traj, reward in zip(trajectories, rewards):
        traj.reward = reward
    for traj, score in zip(trajectories, teacher_scores[0] if teacher_scores else []):
        start = traj.response_start
        # Teachers score from the response start; earlier positions are never trained on.
        traj.teacher_logprobs = [0.0] * start + list(score.token_logprobs)
        if settings.teacher_top_k:
            traj.teacher_topk_ids = [[]] * start + [list(r) for r in score.top_ids]
            traj.teacher_topk_logprobs = [[]] * start + [list(r) for r in score.top_logprobs]
    return trajectories


async def collect_trajectories(
    engine, teachers, tokenizer, records: list[PromptRecord], settings: RolloutSettings
) -> list[Trajectory]:
    """Sample n responses per prompt, score them with the domain teachers and verifiers.

    Args:
        engine: the rollout engine's client (`EngineClient`).
        teachers: the `TeacherPool`.
        tokenizer: the student's tokenizer (to decode responses for the verifiers).
        records: this step's prompts, tokenised (`prompt_ids` set).
        settings: sampling, n, chunking and the teacher top-k.

    Returns:
        The trajectories, n per prompt, in prompt order (group = the prompt's index).
    """
    n = settings.n_samples_per_prompt
    expanded = [r for r in records for _ in range(n)]
    groups = [i for i in range(len(records)) for _ in range(n)]
    size = max(1, settings.chunk_size)
    chunks = [
        _collect_chunk(engine, teachers, tokenizer, expanded[i : i + size], groups[i : i + size],
                       settings)
        for i in range(0, len(expanded), size)
    ]
    return [t for chunk in await asyncio.gather(*chunks) for t in chunk]


async def evaluate_engine(
    engine, tokenizer, records: list[PromptRecord], max_new_tokens: int
) -> dict[str, float]:
    """Greedy accuracy per domain of the model an engine serves, on held-out prompts."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    generations = await engine.agenerate([r.prompt_ids for r in records], greedy)
    texts = tokenizer.batch_decode([g.output_ids for g in generations], skip_special_tokens=True)
    rewards = await asyncio.to_thread(score_batch, records, texts)
    totals: dict[str, list[float]] = {}
    for record, reward in zip(records, rewards):
        totals.setdefault(record.domain, []).append(reward)
    return {domain: sum(v) / len(v) for domain, v in sorted(totals.items())}
