"""Multi-turn agentic rollouts: tools in the sandbox, token-exact episodes on the embedded
engine over HTTP, teacher scores at sampled positions only, and masks every loss respects."""

import dataclasses
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from dist_scripts import train_common as tc
from multirank import run_torchrun
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

from mopd_megatron.collect import RolloutSettings, collect_trajectories
from mopd_megatron.config import AlgorithmConfig, RolloutConfig
from mopd_megatron.demo import agentic
from mopd_megatron.envs import sandbox
from mopd_megatron.envs.environment import (
    Environment,
    StepResult,
    ToolEnvironment,
    make_environment,
    register_environment,
)
from mopd_megatron.envs.tools import Limits, Tool, parse_tool_calls
from mopd_megatron.mopd.batch import build_batch
from mopd_megatron.mopd.objectives import LossContext, build_objective
from mopd_megatron.rollout.client import EngineClient
from mopd_megatron.rollout.multi_turn import (
    TURN_SEED_STRIDE,
    EpisodeLimits,
    call_close_id,
    observation_ids,
    render,
    run_episodes,
    start_episode,
)
from mopd_megatron.rollout.sglang import start_engine
from mopd_megatron.rollout.transport import run_sync
from mopd_megatron.rollout.types import RouteShape, SamplingParams
from mopd_megatron.summary import episode_scalars
from mopd_megatron.teachers.pool import TeacherPool

needs_sandbox = pytest.mark.skipif(sandbox.unavailable_reason() is not None,
                                   reason="bubblewrap sandbox unavailable")


def hang(state, seconds):
    while True:
        pass


def crash(state, seconds):
    raise RuntimeError("tool exploded")


def flood(state, seconds):
    return "x" * 1_000_000


SCHEMA = {"type": "object", "properties": {"seconds": {"type": "number"}},
          "required": ["seconds"]}
FAST = Limits(timeout_s=1.0, memory_bytes=256 << 20, processes=8, output_bytes=1024)


def _call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@needs_sandbox
def test_failing_tools_become_error_observations_and_the_step_goes_on():
    tools = [Tool(fn, "misbehaves", SCHEMA, limits=FAST) for fn in (hang, crash, flood)]
    env = ToolEnvironment([*tools, agentic.LOOKUP], state_key="store")
    record = agentic.make_record(random.Random(0), "t/0")
    env.reset(record)
    key = record.messages[0]["content"][4:-1]
    text = "".join([_call("hang", seconds=1), _call("crash", seconds=1),
                    _call("flood", seconds=1), _call("nope"), "<tool_call>{oops</tool_call>",
                    _call("lookup"), _call("lookup", key=key)])
    result = env.step({"role": "assistant", "content": text})
    contents = [m["content"] for m in result.observation]
    assert not result.done and result.tool_calls == 7 and result.tool_errors == 6
    assert contents[0] == "error: hang timed out after 1s"
    assert contents[1] == "error: crash failed: RuntimeError: tool exploded"
    assert contents[2] == "error: flood printed more than 1024 bytes"
    assert contents[3].startswith("error: unknown tool 'nope'")
    assert contents[4].startswith("error: tool call is not valid JSON")
    assert contents[5] == "error: lookup: missing arguments ['key'], unknown arguments []"
    assert contents[6] == record.answer  # the good call after the bad ones still works
    assert env.step({"role": "assistant", "content": record.answer}).done


def test_tool_calls_parse_in_the_qwen3_format():
    text = 'a<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>b'
    assert parse_tool_calls(text)[0] == dataclasses.replace(
        parse_tool_calls(text)[0], name="f", arguments={"x": 1}, error="")
    assert parse_tool_calls("no call") == []


class EchoEnvironment(Environment):
    """Answers every message with a tool message, so that episodes last `max_turns` turns
    unless the model ends its message with <eos>."""

    def reset(self, record):
        self.turn = 0
        return [{"role": "user", "content": record.prompt}], [agentic.LOOKUP.schema()]

    def step(self, message):
        self.turn += 1
        return StepResult(observation=[{"role": "tool", "content": f"seen {self.turn}"}])


register_environment("echo_test", EchoEnvironment)


@pytest.fixture(scope="module")
def agentic_dir(tmp_path_factory):
    """A tiny random Qwen3-MoE over the agentic chat tokenizer."""
    path = tmp_path_factory.mktemp("agentic_model")
    tokenizer = agentic.build_tokenizer(path)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, intermediate_size=64,
        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    Qwen3MoeForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(agentic_dir, tmp_path_factory):
    cfg = RolloutConfig(engine="local", routing_replay=True)  # it returns routed experts
    with start_engine(cfg, str(agentic_dir), tmp_path_factory.mktemp("logs"), "rollout") as h:
        yield EngineClient(h.url, batch_size=8, max_concurrency=4)


@pytest.fixture(scope="module")
def tokenizer(agentic_dir):
    return AutoTokenizer.from_pretrained(agentic_dir)


def _records(n: int):
    from mopd_megatron.data import PromptRecord
    return [PromptRecord(domain="echo", prompt=f"say {c}=", environment="echo_test",
                         answer="x", verifier="exact", id=f"echo/{i}")
            for i, c in enumerate("abcdef"[:n])]


def _sampling(tokenizer) -> SamplingParams:
    # Letters stop a turn early, so that episodes have several short turns.
    letters = tuple(tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklm")
    return SamplingParams(temperature=1.0, max_new_tokens=6, stop_token_ids=letters,
                          sampling_seed=77)


LIMITS = EpisodeLimits(max_turns=4, max_tokens=200)
ROUTES = RouteShape(num_layers=2, top_k=2, num_experts=4)


@pytest.fixture(scope="module")
def episodes(engine, tokenizer):
    return run_sync(run_episodes(engine, tokenizer, _records(4), _sampling(tokenizer), LIMITS,
                                 ROUTES))


def test_decoding_an_episode_reproduces_the_chat_template(episodes, tokenizer):
    assert max(e.turns for e in episodes) >= 3  # several turns with observations between
    for e in episodes:
        decoded = tokenizer.decode(e.token_ids)
        full = render(tokenizer, e.messages, e.tools, generation=False)
        ended_with_eos = e.token_ids[-1] == tokenizer.eos_token_id and e.loss_mask[-1]
        assert full == (decoded if ended_with_eos else decoded + tokenizer.eos_token)
        assert len(e.token_ids) == len(e.loss_mask) == len(e.logprobs)
        assert all(lp == 0.0 for lp, m in zip(e.logprobs, e.loss_mask) if not m)
        tool_text = "".join(tokenizer.decode([t]) for t, m in zip(e.token_ids, e.loss_mask)
                            if not m)
        for m in e.messages:  # every observation lies in masked (untrained) tokens
            if m["role"] == "tool":
                assert f"<tool_response>{m['content']}</tool_response>" in tool_text


def _segments(mask: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of sampled tokens: one per turn."""
    starts = [t for t in range(len(mask)) if mask[t] and (t == 0 or not mask[t - 1])]
    return [(s, next((u for u in range(s, len(mask)) if not mask[u]), len(mask)))
            for s in starts]


def test_sampled_tokens_are_exactly_the_engines(episodes, engine, tokenizer):
    """Each turn, replayed alone from its exact prefix with its seed, gives the same ids,
    log-probs and routes: the episode holds the engine's tokens, never re-tokenised text, and
    each sampled token keeps its own turn's decode routes (no later prefill overwrote them)."""
    sampling = _sampling(tokenizer)
    params = dataclasses.replace(sampling, stop_token_ids=(*sampling.stop_token_ids,
                                                           call_close_id(tokenizer)))
    for turn in range(max(e.turns for e in episodes)):
        active = [e for e in episodes if e.turns > turn]  # the turn's request list, in order
        for index, e in enumerate(active):
            start, end = _segments(e.loss_mask)[turn]
            seed = sampling.sampling_seed + turn * TURN_SEED_STRIDE  # item i gets seed + i
            prompts = [e.token_ids[:start]] * (index + 1)
            gen = run_sync(engine.agenerate(
                prompts, dataclasses.replace(params, sampling_seed=seed), ROUTES))[index]
            assert gen.output_ids == e.token_ids[start:end]
            assert gen.output_logprobs == pytest.approx(e.logprobs[start:end], abs=1e-6)
            routes = torch.cat(e.routes)
            assert torch.equal(routes[start:end - 1], gen.routed_experts[start:end - 1])
    for e in episodes:
        routes = torch.cat(e.routes)
        assert routes.shape == (len(e.token_ids), 2, 2)
        assert torch.all(routes[-1] == -1) and torch.all(routes[:-1] >= 0)


def test_one_prefill_teacher_scores_equal_turn_by_turn(episodes, engine):
    for e in episodes:
        first = e.loss_mask.index(1)
        whole = run_sync(engine.ascore([e.token_ids], [first], top_k=3))[0]
        for start, end in _segments(e.loss_mask):
            part = run_sync(engine.ascore([e.token_ids[:end]], [start], top_k=3))[0]
            assert part.token_logprobs == pytest.approx(
                whole.token_logprobs[start - first:end - first], abs=1e-5)
            assert part.top_ids == whole.top_ids[start - first:end - first]


def test_collected_episodes_carry_teacher_values_only_where_the_student_sampled(
        engine, tokenizer):
    pool = TeacherPool({"t": engine}, {"echo": "t"})
    settings = RolloutSettings(_sampling(tokenizer), n_samples_per_prompt=2, chunk_size=3,
                               teacher_top_k=4, episodes=LIMITS)
    trajectories = run_sync(collect_trajectories(engine, pool, tokenizer, _records(3), settings))
    assert [t.group for t in trajectories] == [0, 0, 1, 1, 2, 2]
    for traj in trajectories:
        assert traj.environment == "echo_test" and traj.turns >= 1
        for t, m in enumerate(traj.loss_mask):
            if m:
                assert traj.teacher_logprobs[t] < 0 and len(traj.teacher_topk_ids[t]) == 4
            else:
                assert traj.teacher_logprobs[t] == 0.0 and traj.teacher_topk_ids[t] == []
    scalars = episode_scalars(trajectories, ["echo"])
    assert scalars["agent/turns/echo"] == sum(t.turns for t in trajectories) / 6
    assert 0 < scalars["agent/masked_share"] < 1


@pytest.mark.parametrize("loss", ["pg", "topk", "grpo", "forward_kl", "full_rkl"])
def test_no_observation_position_reaches_a_loss_or_metric(loss):
    vocab = 20
    results = []
    for garbage in (False, True):
        batch = build_batch(tc.multi_turn_trajectories(vocab, garbage), pad_id=0,
                            domains=["echo"], topk=4)
        gen = torch.Generator().manual_seed(1)
        logits = torch.randn(*batch["tokens"].shape, vocab, generator=gen, requires_grad=True)
        teacher = torch.randn(*batch["tokens"].shape, vocab, generator=gen)
        if garbage:  # teacher logits too: anything at masked positions
            teacher = torch.where(batch["loss_mask"][..., None] > 0, teacher, teacher * 50)
        batch["teacher_logits"] = teacher
        objective = build_objective(AlgorithmConfig(loss=loss, topk=4, orm_coef=0.5),
                                    LossContext(vocab_size=vocab))
        loss_sum, units, metrics = objective(logits, batch)
        loss_sum.backward()
        masked = batch["loss_mask"] == 0
        assert torch.all(logits.grad[masked] == 0)  # no gradient from an observation
        results.append((loss_sum.detach(), units, {k: v.detach() for k, v in metrics.items()}))
    (clean_loss, clean_units, clean_metrics), (loss_g, units_g, metrics_g) = results
    assert torch.equal(clean_loss, loss_g) and torch.equal(clean_units, units_g)
    for name, value in clean_metrics.items():
        assert torch.equal(value, metrics_g[name]), name


def test_records_name_their_environment():
    from mopd_megatron.data.records import parse_record
    record = parse_record({"prompt": "get abc=", "domain": "lookup", "environment": "lookup"},
                          "x:1")
    assert record.environment == "lookup" and record.to_json()["environment"] == "lookup"
    assert isinstance(make_environment("lookup"), ToolEnvironment)
    with pytest.raises(KeyError, match="unknown environment 'nowhere'"):
        make_environment("nowhere")


@pytest.fixture(scope="module")
def layouts(tiny_moe_dir):
    return run_torchrun("multi_turn_layouts.py", 2, "--hf", str(tiny_moe_dir))[0]


@pytest.mark.parametrize("name", ["tp2", "ep2"])
def test_multi_turn_loss_and_weights_are_layout_invariant(layouts, name):
    ref, got = layouts["dp2"], layouts[name]
    for key in ("loss", "grad_norm", "kl_sum", "tokens", "num_units"):
        torch.testing.assert_close(torch.tensor([s[key] for s in got["steps"]]),
                                   torch.tensor([s[key] for s in ref["steps"]]),
                                   rtol=1e-5, atol=1e-5)
    sampled = sum(sum(t.loss_mask) for t in tc.multi_turn_trajectories(tc.VOCAB))
    assert ref["steps"][0]["tokens"] == sampled  # observations counted nowhere
    torch.testing.assert_close(torch.tensor(got["weights"]), torch.tensor(ref["weights"]),
                               rtol=0, atol=1e-5)


def test_the_toy_chat_format_expresses_tool_calls(tokenizer):
    record = agentic.make_record(random.Random(3), "t/3")
    prompt, rest = agentic.transcript(tokenizer, record, "call")
    ids = tokenizer(prompt + rest, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt + rest  # one token per character or chat token
    call = parse_tool_calls(rest)[0]
    assert call.name == "lookup" and record.metadata["store"][call.arguments["key"]] == (
        record.answer)
    assert tokenizer.convert_ids_to_tokens(call_close_id(tokenizer)) == "</tool_call>"
    assert prompt.startswith("<tools>lookup</tools><|user|>get ")


class ShoutEnvironment(EchoEnvironment):
    def step(self, message):
        return StepResult(observation=[{"role": "tool", "content": "Seen!"}])


register_environment("shout_test", ShoutEnvironment)


def test_an_observation_the_tokenizer_cannot_spell_is_an_error(engine, tokenizer):
    records = [dataclasses.replace(r, environment="shout_test") for r in _records(1)]
    with pytest.raises(ValueError, match="cannot spell the observation"):
        run_sync(run_episodes(engine, tokenizer, records, _sampling(tokenizer), LIMITS))


def test_the_toy_environment_words_errors_in_its_vocabulary():
    env = make_environment("lookup")
    env.reset(agentic.make_record(random.Random(1), "t/1"))
    result = env.step({"role": "assistant", "content": "<tool_call>{bad</tool_call>"})
    assert [m["content"] for m in result.observation] == ["error"] and result.tool_errors == 1


def test_environments_are_checked_before_any_engine_starts(agentic_dir):
    from mopd_megatron.config import ModelConfig, Recipe, TeacherConfig
    from mopd_megatron.serving import prepare_environments
    recipe = Recipe(model=ModelConfig(hf_path=str(agentic_dir)),
                    rollout=RolloutConfig(max_episode_tokens=255,
                                          environment_modules=["mopd_megatron.demo.agentic"]))
    prepare_environments(recipe, _records(2))  # fits: the context is 256 tokens
    with pytest.raises(ValueError, match=r"\['nowhere'\] that no module in rollout.environ"):
        prepare_environments(recipe, [dataclasses.replace(_records(1)[0], environment="nowhere")])
    recipe.rollout.max_episode_tokens = 256
    with pytest.raises(ValueError, match="max_episode_tokens=256 must be below .*"
                                         "max_position_embeddings=256"):
        prepare_environments(recipe, _records(1))
    prepare_environments(recipe, [dataclasses.replace(_records(1)[0], environment=None)])
    recipe.rollout.max_episode_tokens, recipe.rollout.source = 255, "teacher_samples"
    with pytest.raises(ValueError, match="source=teacher_samples samples single turns"):
        prepare_environments(recipe, _records(1))
    recipe.rollout.source = "on_policy"
    recipe.teachers.teachers = [TeacherConfig(name="t", payload="student_topk")]
    with pytest.raises(ValueError, match="payload=student_topk needs single-turn records"):
        prepare_environments(recipe, _records(1))


def test_a_reading_demonstration_teaches_only_the_answer(tokenizer):
    record = agentic.make_record(random.Random(5), "t/5")
    called, _ = agentic.transcript(tokenizer, record, "call")
    prompt, rest = agentic.transcript(tokenizer, record, "read")
    assert rest == record.answer
    assert prompt.startswith(called) and prompt.endswith(
        f"<tool_response>{record.answer}</tool_response><eos><|assistant|>")
    guess_prompt, guess = agentic.transcript(tokenizer, record, "guess")
    assert guess_prompt == called and len(guess) == agentic.VALUE_LENGTH


def test_quick_agentic_demo_runs_the_whole_loop(tmp_path):
    """`python -m mopd_megatron.demo.agentic --quick`: world, engines over HTTP, episodes,
    Megatron steps, weight sync, greedy-episode evaluation and the report."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "mopd_megatron.demo.agentic", "--quick",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").open()]
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert h["agent/turns/lookup"] >= 1 and 0 <= h["agent/masked_share"] < 1
        assert {"agent/tool_calls/lookup", "agent/tool_errors/lookup", "kl/lookup"} <= set(h)
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())["scores"]
    assert set(scores["student after"]) == {"lookup"}
    assert (tmp_path / "run" / "agent_episodes.png").stat().st_size > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "![multi-turn episodes](agent_episodes.png)" in report


def test_a_template_that_re_renders_past_turns_still_gets_its_glue():
    """A template that shows a past assistant turn otherwise than it was sampled (here without
    its text up to '='; Qwen3's drops an empty <think> block) continues from the sampled
    tokens with exactly the glue the template puts after that turn."""
    tokenizer = agentic.build_tokenizer()
    tokenizer.chat_template = agentic.CHAT_TEMPLATE.replace(
        "<|{{ m.role }}|>{{ m.content }}",
        "<|{{ m.role }}|>{{ m.content.split('=')[-1] if m.role == 'assistant' and not loop.last "
        "else m.content }}")
    episode = start_episode(tokenizer, _records(1)[0], LIMITS)
    episode.token_ids += tokenizer("ab=cd", add_special_tokens=False)["input_ids"]
    episode.messages.append({"role": "assistant", "content": "ab=cd"})
    observation = [{"role": "tool", "content": "seen 1"}]
    ids = observation_ids(tokenizer, episode, observation)
    assert tokenizer.decode(ids) == (
        "<eos><|tool|><tool_response>seen 1</tool_response><eos><|assistant|>")
    rendered = render(tokenizer, episode.messages + observation, episode.tools, generation=True)
    assert "ab=cd" not in rendered  # the template itself no longer shows what was sampled
