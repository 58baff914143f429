"""The rollout phase of one MOPD step: prompts -> scored trajectories.

    prompts ──rollout engine──▶ n responses each (+ μθ per token)
            ──domain teacher──▶ log π_T of every response token (+ its top-k, or its
                                log-probs at the engine's top-k of the student)
            ──verifier───────▶ outcome reward

Runs on the rank that owns the engines (global rank 0). Generation goes out in request-sized
chunks and each chunk is sent to its teachers as soon as it comes back, so teacher
prefill overlaps the sampling of the next chunks. Evaluation uses the same engines greedily.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from .data import PromptRecord
from .mopd.rewards import score_batch
from .rollout.multi_turn import DEFAULT_LIMITS, Episode, EpisodeLimits, run_episodes
from .rollout.types import Generation, RouteShape, SamplingParams
from .trajectory import Trajectory, route_dtype


@dataclass
class RolloutSettings:
    sampling: SamplingParams
    n_samples_per_prompt: int
    chunk_size: int
    """Prompts per generation chunk (the unit of overlap with teacher scoring)."""
    teacher_top_k: int
    use_teachers: bool = True
    """False for the outcome-only (GRPO) baselines: no teacher is asked to score."""
    teacher_hidden_states: bool = False
    """Ask the teachers for their final hidden states (the `hidden_states` payload)."""
    routes: RouteShape | None = None
    """Routing replay: ask the engine for every token's routed experts, of this shape."""
    student_top_k: int = 0
    """Ask the rollout engine for its top-k ids at each sampled position and the teachers for
    their log-probs at exactly those ids (the `student_topk` payload; 0 = off)."""
    episodes: EpisodeLimits = DEFAULT_LIMITS
    """Turn and token budgets of records that name an environment (multi-turn)."""


def _trajectory(gen: Generation, record: PromptRecord, group: int,
                routes: RouteShape | None) -> Trajectory:
    traj = Trajectory.single_turn(
        gen.prompt_ids, gen.output_ids, gen.output_logprobs, domain=record.domain, group=group,
        reward=0.0, finish_reason=gen.finish_reason,
    )
    if routes is not None:  # the engine routes every token but the last
        last = torch.full((1, routes.num_layers, routes.top_k), -1, dtype=torch.int32)
        traj.routed_experts = torch.cat([gen.routed_experts, last]).to(
            route_dtype(routes.num_experts))
    if gen.top_ids is not None:  # the student's top-k: the support its teacher is asked for
        traj.teacher_topk_ids = [[]] * len(gen.prompt_ids) + gen.top_ids
    return traj


def _episode_trajectory(e: Episode, record: PromptRecord, group: int,
                        routes: RouteShape | None) -> Trajectory:
    return Trajectory(
        e.token_ids, e.loss_mask, e.logprobs, domain=record.domain, group=group,
        finish_reason=e.finish_reason, environment=record.environment, turns=e.turns,
        tool_calls=e.tool_calls, tool_errors=e.tool_errors,
        routed_experts=torch.cat(e.routes).to(route_dtype(routes.num_experts)) if routes
        else None)


async def _generate(engine, tokenizer, records, groups, sampling, settings):
    """(trajectories, answer texts for the verifiers, environment rewards or None) of a
    chunk: one generation per record, or one episode when the chunk's records name an
    environment (chunks are of one kind)."""
    if records[0].environment:
        if settings.student_top_k:
            raise ValueError("the student_topk teacher payload needs single-turn records: "
                             f"record of environment {records[0].environment!r} is multi-turn "
                             "(use payload topk)")
        episodes = await run_episodes(engine, tokenizer, records, sampling, settings.episodes,
                                      settings.routes)
        trajectories = [_episode_trajectory(e, r, g, settings.routes)
                        for e, r, g in zip(episodes, records, groups)]
        return trajectories, [e.answer for e in episodes], [e.reward for e in episodes]
    prompts = [r.prompt_ids for r in records]
    generations = await engine.agenerate(prompts, sampling, settings.routes,
                                         settings.student_top_k)
    texts = tokenizer.batch_decode([g.output_ids for g in generations], skip_special_tokens=True)
    trajectories = [_trajectory(g, r, grp, settings.routes)
                    for g, r, grp in zip(generations, records, groups)]
    return trajectories, texts, [None] * len(records)


async def _collect_chunk(engine, teachers, tokenizer, records, groups, settings) -> list:
    trajectories, texts, env_rewards = await _generate(engine, tokenizer, records, groups,
                                                       settings.sampling, settings)
    jobs = [asyncio.to_thread(score_batch, records, texts)]  # verifiers beside the teachers
    supports = ([_student_support(t) for t in trajectories] if settings.student_top_k
                else [None] * len(trajectories))
    if settings.use_teachers:
        jobs.append(teachers.ascore(
            [t.token_ids for t in trajectories],
            [t.response_start for t in trajectories],
            [t.domain for t in trajectories],
            top_k=settings.teacher_top_k, hidden_states=settings.teacher_hidden_states,
            token_ids=supports if settings.student_top_k else None,
        ))
    rewards, *teacher_scores = await asyncio.gather(*jobs)
    for traj, reward, env_reward in zip(trajectories, rewards, env_rewards):
        traj.reward = reward if env_reward is None else env_reward
    for traj, score, support in zip(trajectories, teacher_scores[0] if teacher_scores else [],
                                    supports):
        _attach_teacher(traj, score, settings.teacher_top_k, support)
    return trajectories


def _student_support(traj: Trajectory) -> list[int]:
    """The union of the student's top-k ids over the trajectory's positions: SGLang's
    `token_ids_logprob` asks for one id list per sequence, answered at every position."""
    return sorted({v for row in traj.teacher_topk_ids for v in row})


def _attach_at_student_topk(traj: Trajectory, score, support: list[int],
                            sampled: list[bool]) -> None:
    """teacher_topk_logprobs[t] = the teacher's log-probs at exactly the student's top-k ids
    at t (`teacher_topk_ids[t]`), picked from its answer for the whole support."""
    column = {v: j for j, v in enumerate(support)}
    start = traj.response_start
    rows = [(ids, [lps[column[v]] for v in ids]) if keep else ([], []) for ids, lps, keep in
            zip(traj.teacher_topk_ids[start:], score.token_ids_logprobs, sampled)]
    traj.teacher_topk_ids = [[]] * start + [ids for ids, _ in rows]
    traj.teacher_topk_logprobs = [[]] * start + [lps for _, lps in rows]


def _attach_teacher(traj: Trajectory, score, top_k: int,
                    support: list[int] | None = None) -> None:
    """Teacher values at the student's sampled positions only. Teachers score everything
    from the first sampled token in one prefill; the prompt, tool outputs and template glue
    (loss mask 0) get no teacher value, so no loss or metric can ever use one there."""
    start, mask = traj.response_start, traj.loss_mask
    sampled = [mask[t] == 1 for t in range(start, len(mask))]
    traj.teacher_logprobs = [0.0] * start + [
        lp if keep else 0.0 for lp, keep in zip(score.token_logprobs, sampled)]
    if top_k:
        traj.teacher_topk_ids = [[]] * start + [
            list(r) if keep else [] for r, keep in zip(score.top_ids, sampled)]
        traj.teacher_topk_logprobs = [[]] * start + [
            list(r) if keep else [] for r, keep in zip(score.top_logprobs, sampled)]
    if support is not None:
        _attach_at_student_topk(traj, score, support, sampled)
    if score.hidden_states is not None:
        traj.teacher_hidden = score.hidden_states * torch.tensor(sampled)[:, None]


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
    # Chunks of one kind (single-turn, or episodes); results return to prompt order.
    kinds = [[i for i, r in enumerate(expanded) if bool(r.environment) == multi_turn]
             for multi_turn in (False, True)]
    index_chunks = [idx[c : c + size] for idx in kinds for c in range(0, len(idx), size)]
    chunks = [
        _collect_chunk(engine, teachers, tokenizer, [expanded[i] for i in idx],
                       [groups[i] for i in idx], settings)
        for idx in index_chunks
    ]
    out: list[Trajectory | None] = [None] * len(expanded)
    for idx, trajectories in zip(index_chunks, await asyncio.gather(*chunks)):
        for i, traj in zip(idx, trajectories):
            out[i] = traj
    return out


async def evaluate_engine(
    engine, tokenizer, records: list[PromptRecord], max_new_tokens: int,
    episodes: EpisodeLimits = DEFAULT_LIMITS,
) -> dict[str, float]:
    """Greedy accuracy per domain of the model an engine serves, on held-out prompts (a
    record naming an environment is scored on its greedy episode's outcome)."""
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    settings = RolloutSettings(greedy, 1, len(records), 0, use_teachers=False,
                               episodes=episodes)
    totals: dict[str, list[float]] = {}
    for multi_turn in (False, True):
        kind = [r for r in records if bool(r.environment) == multi_turn]
        if not kind:
            continue
        _, texts, env_rewards = await _generate(engine, tokenizer, kind, [0] * len(kind),
                                                greedy, settings)
        rewards = await asyncio.to_thread(score_batch, kind, texts)
        for record, reward, env_reward in zip(kind, rewards, env_rewards):
            totals.setdefault(record.domain, []).append(
                reward if env_reward is None else env_reward)
    return {domain: sum(v) / len(v) for domain, v in sorted(totals.items())}
