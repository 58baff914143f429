"""The embedded engine's routed experts (routing replay's engine half), as SGLang returns them.

`meta_info["routed_experts"]` is base64 int32 [seqlen - 1 - start, layers, top_k] for the
positions [routed_experts_start_len, seqlen - 1); every row must be the top-k the model's own
router picks for that token in a plain transformers forward, also for prompt tokens whose KV
(and routes) came from the prefix cache and for the tokens sampled during decoding.
"""

import base64

import numpy as np
import pytest
import torch
from test_engine_sglang_parity import call, generate
from transformers import AutoConfig, AutoModelForCausalLM

from mopd_megatron.collect import _trajectory
from mopd_megatron.config import RolloutConfig
from mopd_megatron.data import PromptRecord
from mopd_megatron.rollout.client import EngineClient
from mopd_megatron.rollout.local_batch import BatchRunner
from mopd_megatron.rollout.local_engine import LocalModel
from mopd_megatron.rollout.local_requests import SeqRequest
from mopd_megatron.rollout.sglang import start_engine
from mopd_megatron.rollout.types import ResponseError, RouteShape, SamplingParams, parse_routes

PROMPTS = [[5, 9, 12, 7, 3, 8], [4, 4, 10], [11, 6, 5, 9, 13, 20, 21, 7, 6]]


@pytest.fixture(scope="module")
def shape(tiny_moe_dir):
    config = AutoConfig.from_pretrained(tiny_moe_dir)
    return RouteShape(config.num_hidden_layers, config.num_experts_per_tok, config.num_experts)


@pytest.fixture(scope="module")
def engine(tiny_moe_dir, tmp_path_factory):
    cfg = RolloutConfig(engine="local")  # routing_replay is on by default
    with start_engine(cfg, str(tiny_moe_dir), tmp_path_factory.mktemp("logs"), "routes") as h:
        yield h.url


@pytest.fixture(scope="module")
def router_topk(tiny_moe_dir):
    """The experts the model's own routers pick for every token of a sequence, [len, L, k]."""
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()

    def topk(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_router_logits=True)
        k = model.config.num_experts_per_tok
        return torch.stack([logits.topk(k, dim=-1).indices for logits in out.router_logits], 1)
    return topk


def decode(meta, shape):
    raw = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32)
    return torch.from_numpy(raw.copy()).view(-1, shape.num_layers, shape.top_k)


def test_routes_are_the_models_own_top_k(engine, router_topk, shape):
    """Prompt and sampled tokens alike; the last token (never run) has no route."""
    reply = generate(engine, {"input_ids": PROMPTS, "return_routed_experts": True,
                              "sampling_params": {"max_new_tokens": 6, "sampling_seed": 3}})
    for prompt, item in zip(PROMPTS, reply):
        sequence = prompt + item["output_ids"]
        routes = decode(item["meta_info"], shape)
        assert routes.shape[0] == len(sequence) - 1
        assert torch.equal(routes, router_topk(sequence)[:-1].int())


def test_cached_prefixes_keep_their_routes_and_the_start_slices(engine, router_topk, shape):
    prompt = PROMPTS[2]
    body = {"input_ids": prompt, "return_routed_experts": True, "routed_experts_start_len": 4,
            "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
    generate(engine, body)
    again = generate(engine, body)
    assert again["meta_info"]["cached_tokens"] >= len(prompt) - 1  # the prompt came from cache
    sequence = prompt + again["output_ids"]
    assert torch.equal(decode(again["meta_info"], shape), router_topk(sequence)[4:-1].int())


def test_routes_only_when_asked_and_start_checked_as_sglang(engine, tiny_moe_dir):
    plain = generate(engine, {"input_ids": PROMPTS[0], "sampling_params": {"max_new_tokens": 2}})
    assert "routed_experts" not in plain["meta_info"]
    status, reply = call(engine, "/generate", {"input_ids": PROMPTS[1], "return_routed_experts":
                                               True, "routed_experts_start_len": 4})
    assert status == 400 and "routed_experts_start_len=4 is higher than the number of input " \
        "tokens" in reply["error"]["message"]
    assert call(engine, "/server_info")[1]["enable_return_routed_experts"] is True
    # A server started without --enable-return-routed-experts returns none, as SGLang.
    runner = BatchRunner(LocalModel(str(tiny_moe_dir)), None)
    result = runner.run([SeqRequest(PROMPTS[0], max_new_tokens=2, return_routed_experts=True)])
    assert "routed_experts" not in result[0]["meta_info"]


def test_client_routes_reach_the_trajectory_compactly(engine, router_topk, shape):
    """−1 (never expert 0) for the last token; the smallest dtype for the expert count."""
    client = EngineClient(engine)
    gens = client.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, sampling_seed=1), shape)
    record = PromptRecord(domain="add", prompt="", prompt_ids=PROMPTS[0])
    traj = _trajectory(gens[0], record, 0, shape)
    assert traj.routed_experts.dtype == torch.int8
    assert traj.routed_experts.shape == (len(traj.token_ids), shape.num_layers, shape.top_k)
    assert (traj.routed_experts[-1] == -1).all()
    assert torch.equal(traj.routed_experts[:-1].int(), router_topk(traj.token_ids)[:-1].int())


def test_routes_that_do_not_fit_the_student_are_refused(shape):
    rows = torch.zeros(4, shape.num_layers, shape.top_k, dtype=torch.int32)
    encoded = base64.b64encode(rows.numpy().tobytes()).decode()
    with pytest.raises(ResponseError, match="enable-return-routed-experts"):
        parse_routes({}, 4, shape, "result 0")
    with pytest.raises(ResponseError, match="expected 5 tokens"):
        parse_routes({"routed_experts": encoded}, 5, shape, "result 0")
    rows[1, 0, 0] = shape.num_experts
    bad = base64.b64encode(rows.numpy().tobytes()).decode()
    with pytest.raises(ResponseError, match="outside"):
        parse_routes({"routed_experts": bad}, 4, shape, "result 0")
