"""The HTTP client against the embedded CPU engine over real HTTP, checked against transformers.

One engine process serves the tiny Qwen3-MoE for the whole module. Every /generate body the
client sends is decoded with SGLang's own `GenerateRequest` and every reply item with
`GenerateResponse` (the contract types copied from the sglang 0.5.23 wheel).
"""

import asyncio
import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from mopd_megatron.config import EngineConfig
from mopd_megatron.rollout import (
    EngineClient,
    EngineError,
    SamplingParams,
    start_engine,
)
from mopd_megatron.rollout.sglang_contract import load_api_types

TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_moe_dir, tmp_path_factory):
    cfg = EngineConfig(engine="local")
    with start_engine(cfg, str(tiny_moe_dir), tmp_path_factory.mktemp("logs"), "rollout") as h:
        process = h.process
        yield h
    assert process.poll() is not None  # stopped on exit


@pytest.fixture(scope="module")
def reference(tiny_moe_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()


class Recorder(EngineClient):
    """A real client that also keeps every (path, request body, reply) it exchanged."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.traffic = []

    async def _http(self, method, path, body):
        status, data = await super()._http(method, path, body)
        self.traffic.append((path, None if body is None else json.loads(body), status, data))
        return status, data


@pytest.fixture
def client(engine):
    """A recording client; on teardown, all /generate traffic is checked against SGLang's types."""
    rec = Recorder(engine.url, batch_size=5, max_concurrency=3)
    yield rec
    api = load_api_types()
    generate = [t for t in rec.traffic if t[0] == "/generate" and t[2] == 200]
    for _, body, _, data in generate:
        api.GenerateRequest.from_json_value(body)
        reply = json.loads(data)
        for item in reply if isinstance(reply, list) else [reply]:
            api.GenerateResponse.from_json_value(item)


def ref_logprobs(model, seq, temperature=1.0):
    """[len-1] log p(seq[t] | seq[:t]) for t >= 1, and the [len-1, V] log-softmax rows."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0], logp


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 42, (int(k),), generator=g).tolist()
            for k in torch.randint(3, 12, (n,), generator=g)]


def test_sampled_logprobs_equal_transformers_at_temperature(client, reference):
    batch = prompts(12)
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=6)
    gens = client.generate(batch, sampling)
    assert [g.prompt_ids for g in gens] == batch  # input order across 3 concurrent requests
    for g in gens:
        assert len(g.output_ids) == len(g.output_logprobs) >= 1
        assert g.finish_reason in ("stop", "length")
        assert g.finish_reason == "stop" or len(g.output_ids) == 6
        ref, _ = ref_logprobs(reference, g.prompt_ids + g.output_ids, temperature=0.7)
        got = torch.tensor(g.output_logprobs)
        assert torch.allclose(got, ref[len(g.prompt_ids) - 1:], atol=TOL, rtol=0)


def test_seeded_sampling_is_reproducible_whatever_the_batching(client, engine):
    batch = prompts(9, seed=3)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, sampling_seed=1000)
    first = [g.output_ids for g in client.generate(batch, sampling)]  # requests of 5 + 4
    other = EngineClient(engine.url, batch_size=9)  # one request of 9
    assert [g.output_ids for g in other.generate(batch, sampling)] == first
    reseeded = SamplingParams(temperature=1.0, max_new_tokens=6, sampling_seed=2000)
    assert [g.output_ids for g in client.generate(batch, reseeded)] != first


def test_greedy_follows_argmax_and_stop_tokens(client, reference):
    batch = prompts(4, seed=1)
    gens = client.generate(batch, SamplingParams(temperature=0.0, max_new_tokens=5))
    for g in gens:
        ref, logp = ref_logprobs(reference, g.prompt_ids + g.output_ids)
        start = len(g.prompt_ids) - 1
        assert g.output_ids == logp[start:].argmax(-1).tolist()  # greedy: unscaled log-probs
        assert torch.allclose(torch.tensor(g.output_logprobs), ref[start:], atol=TOL, rtol=0)
    first = gens[0].output_ids[0]
    stopped = client.generate(batch[:1], SamplingParams(temperature=0.0, max_new_tokens=5,
                                                        stop_token_ids=(first,)))[0]
    assert stopped.output_ids == [first] and stopped.finish_reason == "stop"


def test_prefill_scores_and_topk_equal_transformers(client, reference):
    seqs = prompts(7, seed=2)
    starts = [1, 2, len(seqs[2]), 3, 1, len(seqs[5]) - 1, 2]
    scores = client.score(seqs, starts, top_k=5)
    for seq, r, s in zip(seqs, starts, scores):
        ref, logp = ref_logprobs(reference, seq)
        assert len(s.token_logprobs) == len(seq) - r
        assert torch.allclose(torch.tensor(s.token_logprobs).reshape(-1), ref[r - 1:],
                              atol=TOL, rtol=0)
        top = torch.topk(logp[r - 1:], 5, dim=-1)
        assert s.top_ids == top.indices.tolist()
        assert torch.allclose(torch.tensor(s.top_logprobs).reshape(top.values.shape),
                              top.values, atol=TOL, rtol=0)
    assert client.score(seqs[:1], [1])[0].top_ids is None


def test_batching_and_concurrency_keep_input_order(engine, reference):
    batch = prompts(9, seed=3)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=3)
    one_by_one = EngineClient(engine.url, batch_size=1, max_concurrency=4).generate(batch, greedy)
    together = EngineClient(engine.url, batch_size=64).generate(batch, greedy)
    assert [g.output_ids for g in one_by_one] == [g.output_ids for g in together]
    assert [g.prompt_ids for g in one_by_one] == batch

    async def both():  # two callers at once share the engine; each gets its own results
        c = EngineClient(engine.url, batch_size=2)
        return await asyncio.gather(c.agenerate(batch, greedy), c.ascore(batch, [1] * 9))
    gens, scores = asyncio.run(both())
    assert [g.output_ids for g in gens] == [g.output_ids for g in together]
    assert len(scores[4].token_logprobs) == len(batch[4]) - 1


def test_control_endpoints(client, engine, tiny_moe_dir):
    assert client.health()
    assert client.model_info()["model_path"] == str(tiny_moe_dir)
    assert client.server_info()["tp_size"] == 1
    client.flush_cache()
    assert asyncio.run(client._request("GET", "/health_generate", json_reply=False)) == ""


def test_contract_violation_is_a_400_without_retries(engine):
    client = EngineClient(engine.url, max_retries=3)
    body = {"input_ids": [[5, 6]], "sampling_params": {"max_tokens": 3}}  # an OpenAI name
    with pytest.raises(EngineError) as err:
        asyncio.run(client._request("POST", "/generate", body))
    assert err.value.attempts == 1 and "HTTP 400" in str(err.value)
    assert engine.url in str(err.value) and "max_tokens" in str(err.value)
    with pytest.raises(EngineError, match="'stream' is not supported"):
        asyncio.run(client._request("POST", "/generate", {"input_ids": [5], "stream": True}))
    with pytest.raises(EngineError, match="context length of 128 tokens. You requested a total "
                                          "of 129 tokens: 120 tokens from the input"):
        client.generate([[5] * 120], SamplingParams(max_new_tokens=9))


def test_throughput_256_prompts(engine):
    """The CPU demo's rollout shape: 256 prompts x 9 new tokens in one call."""
    client = EngineClient(engine.url, batch_size=64, max_concurrency=8)
    batch = prompts(256, seed=4)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=9, stop_token_ids=())
    client.generate(batch[:8], sampling)  # warm-up
    tic = time.perf_counter()
    gens = client.generate(batch, sampling)
    seconds = time.perf_counter() - tic
    tokens = sum(len(g.output_ids) for g in gens)
    print(f"\nembedded engine: {len(batch)} prompts, {tokens} tokens in {seconds:.3f} s "
          f"= {tokens / seconds:.0f} tokens/s")
    assert seconds < 30  # generous: the CI machine is shared
