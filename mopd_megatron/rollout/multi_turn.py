"""Rollout stage, multi-turn: token-exact episodes of the student with an environment's tools.

Consumes prompt records that name an environment (`envs.environment`) and produces one
`Episode` per record: a single token sequence

    [prompt | sampled turn 1 | glue + observation + generation prompt | sampled turn 2 | ...]

with loss mask 1 and the engine's behaviour log-prob μθ exactly on the sampled tokens, and
0 on the prompt, the tool outputs and the template's glue.

Each turn generates until the model closes a tool call (the chat format's `</tool_call>`
token is a stop token id, kept in the output) or ends its message (EOS), within the turn
and token budgets. The assistant message is the decoded sampled text; the environment
answers it; the observation's tokens are what the chat template renders after that text
(found by rendering the conversation with a marker at the end of the assistant message), and
only this remainder is tokenised and appended. The next turn continues from these exact token
ids; sampled text is never re-tokenised. With a template that renders past messages
verbatim, decoding an episode's tokens reproduces the template's rendering of its
conversation; one that re-renders them (Qwen3's drops a past turn's empty <think> block and
re-spaces its reasoning) still gets the exact sampled tokens and the template's glue after
them.

Routing replay: each token keeps the routes of the forward pass that first computed it
(a sampled token: its turn's decode; an observation token: the next turn's prefill), so a
later turn's prefill never overwrites an earlier turn's decode routes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

import torch

from mopd_megatron.data.tokenize import encode_text
from mopd_megatron.envs.environment import Environment, StepResult, make_environment
from mopd_megatron.envs.tools import CALL_CLOSE
from mopd_megatron.rollout.types import Generation, RouteShape, SamplingParams

END_OF_TURN = "\ue000end-of-sampled-turn\ue000"
"""Marks where an assistant message's sampled text ends in the template's rendering (a
private-use character: no sampled text contains it)."""
TURN_SEED_STRIDE = 1 << 14
"""Turn t of a request list samples with seeds sampling_seed + t * stride + item."""


@dataclass(frozen=True)
class EpisodeLimits:
    """Budgets of one episode."""

    max_turns: int = 4
    """Assistant turns at most (each ends with a tool call or the final answer)."""
    max_tokens: int = 4096
    """Length of the whole token sequence (prompt, turns, observations) at most."""

    @classmethod
    def from_config(cls, cfg) -> EpisodeLimits:
        """The budgets of a `RolloutConfig` (`max_turns`, `max_episode_tokens`)."""
        return cls(cfg.max_turns, cfg.max_episode_tokens)


DEFAULT_LIMITS = EpisodeLimits()


@dataclass
class Episode:
    """One record's episode as it runs, then its trajectory's fields."""

    env: Environment
    messages: list[dict]
    tools: list[dict]
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    routes: list[torch.Tensor] = field(default_factory=list)
    routed: int = 0
    """Positions whose routes are in `routes` (a prefix of the sequence)."""
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    finish_reason: str = ""
    """'' while running; then 'stop' (final answer), 'length', 'max_turns'."""
    reward: float | None = None
    answer: str = ""
    """The last assistant message without special tokens (what the verifier reads)."""


def render(tokenizer, messages: list[dict], tools: list[dict], generation: bool) -> str:
    """The chat template's text of a conversation offered `tools`."""
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=generation)


def call_close_id(tokenizer) -> int:
    """The token id that closes a tool call in the student's chat format."""
    token = tokenizer.convert_tokens_to_ids(CALL_CLOSE)
    if not isinstance(token, int) or token == tokenizer.unk_token_id:
        raise ValueError(f"the student's tokenizer has no single {CALL_CLOSE!r} token; "
                         "multi-turn rollouts stop generation on it")
    return token


def start_episode(tokenizer, record, limits: EpisodeLimits) -> Episode:
    """Reset the record's environment and tokenise the opening prompt (bos as
    `data.encode_text` adds it)."""
    env = make_environment(record.environment)
    messages, tools = env.reset(record)
    ids = encode_text(render(tokenizer, messages, tools, generation=True), tokenizer)
    if len(ids) >= limits.max_tokens:
        raise ValueError(f"{record.id}: the opening prompt has {len(ids)} tokens, no room "
                         f"within rollout.max_episode_tokens={limits.max_tokens}")
    return Episode(env, messages, tools, ids, [0] * len(ids), [0.0] * len(ids))


async def run_episodes(engine, tokenizer, records, sampling: SamplingParams,
                       limits: EpisodeLimits, routes: RouteShape | None = None) -> list[Episode]:
    """Run one episode per record, turn by turn, every active episode's turn in one batch.

    Args:
        engine: the rollout engine's client (`EngineClient`).
        tokenizer: the student's tokenizer (its chat template expresses tool calls).
        records: prompt records naming an environment.
        sampling: the sampling settings; max_new_tokens bounds each turn.
        limits: the turn and token budgets.
        routes: ask the engine for routed experts of this shape (routing replay).

    Returns:
        The finished episodes, in record order.
    """
    stop = call_close_id(tokenizer)
    episodes = await asyncio.gather(*(asyncio.to_thread(start_episode, tokenizer, r, limits)
                                      for r in records))
    for turn in range(limits.max_turns):
        active = [e for e in episodes if not e.finish_reason]
        if not active:
            break
        generations = await _generate_turn(engine, active, sampling, limits, turn, stop, routes)
        await asyncio.gather(*(
            asyncio.to_thread(_advance, tokenizer, e, g, limits, routes)
            for e, g in zip(active, generations)))
    for e in episodes:
        e.finish_reason = e.finish_reason or "max_turns"
        if routes is not None:  # the last token is never run through the model
            missing = len(e.token_ids) - e.routed
            e.routes.append(torch.full((missing, routes.num_layers, routes.top_k), -1,
                                       dtype=torch.int32))
    return list(episodes)


async def _generate_turn(engine, active, sampling, limits, turn, stop, routes):
    """One generation per active episode; episodes with the same room share a request list."""
    room = [min(sampling.max_new_tokens, limits.max_tokens - len(e.token_ids)) for e in active]
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(room):
        groups.setdefault(r, []).append(i)
    jobs, offset = [], 0
    for budget, idx in groups.items():
        seed = sampling.sampling_seed
        if seed is not None:
            seed += turn * TURN_SEED_STRIDE + offset
        params = dataclasses.replace(sampling, max_new_tokens=budget, sampling_seed=seed,
                                     stop_token_ids=(*sampling.stop_token_ids, stop))
        jobs.append(engine.agenerate([active[i].token_ids for i in idx], params, routes))
        offset += len(idx)
    out: list[Generation | None] = [None] * len(active)
    for idx, gens in zip(groups.values(), await asyncio.gather(*jobs)):
        for i, g in zip(idx, gens):
            out[i] = g
    return out


def _advance(tokenizer, e: Episode, gen: Generation, limits: EpisodeLimits,
             routes: RouteShape | None) -> None:
    """Append a turn's sampled tokens, step the environment, append its observation."""
    if routes is not None:
        e.routes.append(gen.routed_experts[e.routed:])
        e.routed = len(gen.routed_experts)
    e.token_ids += gen.output_ids
    e.loss_mask += [1] * len(gen.output_ids)
    e.logprobs += gen.output_logprobs
    e.turns += 1
    ended = gen.output_ids[-1:] == [tokenizer.eos_token_id]  # the template closes with EOS
    content_ids = gen.output_ids[:-1] if ended else gen.output_ids
    message = {"role": "assistant", "content": tokenizer.decode(content_ids)}
    e.answer = tokenizer.decode(content_ids, skip_special_tokens=True)
    e.messages.append(message)
    if gen.finish_reason == "length":
        e.finish_reason = "length"
        return
    result: StepResult = e.env.step(message)
    e.tool_calls += result.tool_calls
    e.tool_errors += result.tool_errors
    e.reward = result.reward
    if result.done or not result.observation:
        e.finish_reason = "stop"
        return
    if e.turns >= limits.max_turns:
        e.finish_reason = "max_turns"
        return
    observation = observation_ids(tokenizer, e, result.observation)
    if len(e.token_ids) + len(observation) >= limits.max_tokens:  # no room for a sampled token
        e.finish_reason = "length"
        return
    e.messages += result.observation
    e.token_ids += observation
    e.loss_mask += [0] * len(observation)
    e.logprobs += [0.0] * len(observation)


def observation_ids(tokenizer, e: Episode, observation: list[dict]) -> list[int]:
    """Tokens of what the template renders after the sampled text: glue, the observation
    messages and the next generation prompt (only this remainder is tokenised).

    The remainder is what follows END_OF_TURN, appended to the last assistant message, in the
    rendering of the conversation; so a template that re-renders earlier text differently
    (Qwen3's drops a past turn's empty <think> block and re-spaces its reasoning) still
    continues from the exact sampled tokens."""
    last = e.messages[-1]
    marked = [*e.messages[:-1], {**last, "content": last["content"] + END_OF_TURN}]
    parts = render(tokenizer, marked + observation, e.tools, generation=True).split(END_OF_TURN)
    if len(parts) != 2:
        raise ValueError("the chat template does not render the end of the assistant's message "
                         "verbatim, so a multi-turn rollout cannot find where the sampled text "
                         "ends and what follows it")
    rest = parts[1]
    ids = list(tokenizer(rest, add_special_tokens=False)["input_ids"])
    if tokenizer.decode(ids) != rest:
        raise ValueError(f"the tokenizer cannot spell the observation {rest!r:.200} (characters "
                         "outside its vocabulary?): its tokens would not be what the template "
                         "renders")
    return ids
