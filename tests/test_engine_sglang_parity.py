"""The embedded engine against SGLang 0.5.23's own endpoint tests, over real HTTP.

Each test restates what one of SGLang's tests asserts (named in its docstring) for the
embedded engine, with token ids instead of text and the tiny model's sizes: test_utils's
run_logprob_check, test_srt_endpoint, test_skip_tokenizer_init, the matched-stop, pause,
abort and basic-API kits, test_update_weights_from_disk. Log-probs are also compared with
transformers, every /generate reply is decoded with SGLang's contract `GenerateResponse`,
and the info routes with `GetServerInfoResponse` / `GetModelInfoResponse`.
"""

import itertools
import json
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd_megatron.config import EngineConfig
from mopd_megatron.rollout import start_engine
from mopd_megatron.rollout.local_prefix_cache import PrefixCache
from mopd_megatron.rollout.sglang_contract import load_api_types
from mopd_megatron.sync import write_hf_checkpoint

TOL = 1e-4
PROMPT = [1, 5, 9, 13, 20, 7, 3, 11, 30, 12]


@pytest.fixture(scope="module")
def engine(tiny_moe_dir, tmp_path_factory):
    with start_engine(EngineConfig(engine="local"), str(tiny_moe_dir),
                      tmp_path_factory.mktemp("logs"), "parity") as handle:
        yield handle.url


@pytest.fixture(scope="module")
def reference(tiny_moe_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_moe_dir, dtype=torch.float32).eval()


def call(url, path, body=None):
    """(status, parsed reply) of one request; POST when there is a body."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            status, raw = reply.status, reply.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def generate(url, body):
    """A /generate that must succeed; the reply is checked with SGLang's contract decoder."""
    status, reply = call(url, "/generate", body)
    assert status == 200, reply
    api = load_api_types()
    for item in reply if isinstance(reply, list) else [reply]:
        api.GenerateResponse.from_json_value(item)
    return reply


def running(url):
    return call(url, "/server_info")[1]["internal_states"][0]["num_running_reqs"]


def in_thread(fn, *args):
    """Start fn(*args) in a thread; returns (thread, box) with the result in box[0]."""
    box = []
    thread = threading.Thread(target=lambda: box.append(fn(*args)), daemon=True)
    thread.start()
    return thread, box


def long_batch(url, rid, rows=16, new=100):
    """Start a batch that decodes for a while; return once the engine runs it."""
    body = {"input_ids": [PROMPT] * rows, "rid": rid,
            "sampling_params": {"temperature": 1.0, "max_new_tokens": new, "ignore_eos": True}}
    thread, box = in_thread(generate, url, body)
    while not running(url):
        time.sleep(0.002)
    return thread, box


def ref_logprobs(model, seq, temperature=1.0):
    """[len-1] log p(seq[t] | seq[:t]) for t >= 1, and the [len-1, V] log-softmax rows."""
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0, :-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0], logp


def check_logprobs(url, args):
    """SGLang's `run_logprob_check` (sglang/test/test_utils.py), scaled to the tiny model."""
    input_len, output_len, temperature, start, return_logprob, top = args
    res = generate(url, {
        "input_ids": list(range(input_len)),
        "sampling_params": {"temperature": temperature, "max_new_tokens": output_len,
                            "ignore_eos": True},
        "return_logprob": return_logprob, "logprob_start_len": start, "top_logprobs_num": top})
    meta = res["meta_info"]
    assert meta["prompt_tokens"] == input_len and meta["completion_tokens"] == output_len
    if return_logprob:
        assert len(meta["input_token_logprobs"]) + start == meta["prompt_tokens"]
        assert len(meta["output_token_logprobs"]) == output_len
        if top:
            assert len(meta["input_top_logprobs"]) + start == meta["prompt_tokens"]
            assert len(meta["output_top_logprobs"]) == output_len
            for entry, row in zip(meta["output_token_logprobs"], meta["output_top_logprobs"]):
                assert len(row) == top
                if temperature == 0:  # the top-1 token is the output (a tie may swap them)
                    assert entry in row[:2] and row[0][0] == pytest.approx(entry[0], abs=1e-6)


def test_logprob_grid_as_run_logprob_check(engine):
    grid = [args for args in itertools.product((12, 30), (4, 8), (0,), (0, 5, 11, 29),
                                               (True, False), (0, 5)) if args[3] < args[0]]
    with ThreadPoolExecutor(8) as pool:  # concurrent, as SGLang's test: batches get merged
        list(pool.map(lambda args: check_logprobs(engine, args), grid))


def test_logprob_match_and_start_len_as_test_srt_endpoint(engine, reference):
    """Output log-probs at T = 1 equal a later prefill of prompt + output (SGLang: < 0.25;
    here also transformers, to 1e-4); prompt_tokens = logprob_start_len + input entries."""
    gen = generate(engine, {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 0,
                            "sampling_params": {"max_new_tokens": 12, "ignore_eos": True}})
    out = [entry[1] for entry in gen["meta_info"]["output_token_logprobs"]]
    assert [entry[1] for entry in gen["meta_info"]["input_token_logprobs"]] == PROMPT
    score = generate(engine, {"input_ids": PROMPT + out, "return_logprob": True,
                              "logprob_start_len": 0, "sampling_params": {"max_new_tokens": 0}})
    scored = [entry[0] for entry in score["meta_info"]["input_token_logprobs"][len(PROMPT):]]
    sampled = [entry[0] for entry in gen["meta_info"]["output_token_logprobs"]]
    ref, _ = ref_logprobs(reference, PROMPT + out)
    assert torch.allclose(torch.tensor(sampled), torch.tensor(scored), atol=TOL, rtol=0)
    assert torch.allclose(torch.tensor(sampled), ref[len(PROMPT) - 1:], atol=TOL, rtol=0)
    assert score["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    for item in generate(engine, {"input_ids": [PROMPT, PROMPT[:7]], "return_logprob": True,
                                  "top_logprobs_num": 5, "logprob_start_len": 4,
                                  "sampling_params": {"temperature": 0, "max_new_tokens": 4}}):
        meta = item["meta_info"]
        assert meta["prompt_tokens"] == 4 + len(meta["input_token_logprobs"])
        assert meta["completion_tokens"] == len(meta["output_token_logprobs"]) == 4


def test_parallel_sampling_as_test_skip_tokenizer_init(engine, reference):
    """n samples per request (a list of n), lengths as SGLang's test asserts; each sample's
    log-probs are transformers' at its temperature; a batch with n is item-major."""
    ids = PROMPT[:6]
    reply = generate(engine, {
        "input_ids": ids, "return_logprob": True, "top_logprobs_num": 3, "logprob_start_len": 0,
        "sampling_params": {"temperature": 0.5, "max_new_tokens": 16, "n": 3, "ignore_eos": True,
                            "stop_token_ids": [119690], "sampling_seed": 3}})
    assert isinstance(reply, list) and len(reply) == 3
    assert len({item["meta_info"]["id"] for item in reply}) == 3
    for item in reply:
        meta = item["meta_info"]
        assert len(item["output_ids"]) == meta["completion_tokens"] == 16
        assert meta["prompt_tokens"] == len(ids) == len(meta["input_token_logprobs"])
        assert len(meta["output_token_logprobs"]) == 16
        ref, _ = ref_logprobs(reference, ids + item["output_ids"], temperature=0.5)
        got = torch.tensor([entry[0] for entry in meta["output_token_logprobs"]])
        assert torch.allclose(got, ref[len(ids) - 1:], atol=TOL, rtol=0)
    batch = generate(engine, {"input_ids": [PROMPT, PROMPT[:4]],
                              "sampling_params": {"n": 2, "max_new_tokens": 3}})
    assert [item["meta_info"]["prompt_tokens"] for item in batch] == [10, 10, 4, 4]


def test_matched_stop_as_the_matched_stop_kit(engine, tiny_moe_dir):
    """finish_reason: stop with `matched` = the stop string, regex or token id; length with
    no `matched`. The finishing token stays in output_ids; `text` is cut before it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_moe_dir)

    def run(**sampling):
        return generate(engine, {"input_ids": PROMPT, "sampling_params": dict(
            {"temperature": 0, "max_new_tokens": 20}, **sampling)})
    greedy = run(ignore_eos=True)["output_ids"]
    assert run(max_new_tokens=5)["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    stop = tokenizer.decode(greedy[4:6])
    res = run(stop=[stop], ignore_eos=True)
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert greedy[:len(res["output_ids"])] == res["output_ids"]
    assert tokenizer.decode(res["output_ids"]).endswith(stop) and stop not in res["text"]
    assert run(stop=stop, no_stop_trim=True, ignore_eos=True)["text"].endswith(stop)
    pattern = f"[{re.escape(stop[0])}]{re.escape(stop[1:])}"
    by_regex = run(stop_regex=pattern, ignore_eos=True)
    assert by_regex["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    assert by_regex["output_ids"] == res["output_ids"]
    token = greedy[2]
    res = run(stop_token_ids=[token])
    assert res["meta_info"]["finish_reason"] == {"type": "stop", "matched": token}
    assert res["output_ids"] == greedy[:greedy.index(token) + 1]
    assert res["text"] == tokenizer.decode(res["output_ids"][:-1], skip_special_tokens=True)
    assert run(stop_token_ids=[token], ignore_eos=True)["output_ids"] == greedy  # SGLang's rule
    samples = generate(engine, {"input_ids": [[5, 6, 7, 8]] * 32, "sampling_params": [  # EOS: 10%
        {"temperature": 1.0, "max_new_tokens": 20, "sampling_seed": i} for i in range(32)]})
    eos = tokenizer.eos_token_id
    ends = [item["meta_info"]["finish_reason"] for item in samples]
    assert {"type": "stop", "matched": eos} in ends
    assert all(end in ({"type": "stop", "matched": eos}, {"type": "length", "length": 20})
               for end in ends)


def test_prefix_cache_reports_cached_tokens(engine, reference):
    """A repeated prompt, a continuation, n samples and a teacher's scoring reuse the cached
    prefix (cached_tokens as SGLang counts it) without changing a log-prob."""
    assert call(engine, "/flush_cache", {})[0] == 200
    body = {"input_ids": PROMPT, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}
    first, again = generate(engine, body), generate(engine, body)
    assert (first["meta_info"]["cached_tokens"], again["meta_info"]["cached_tokens"]) == (0, 9)
    assert again["output_ids"] == first["output_ids"]
    out = first["output_ids"]
    ref, _ = ref_logprobs(reference, PROMPT + out)
    for res in (first, again):
        got = torch.tensor([entry[0] for entry in res["meta_info"]["output_token_logprobs"]])
        assert torch.allclose(got, ref[len(PROMPT) - 1:], atol=TOL, rtol=0)
    turn = generate(engine, dict(body, input_ids=PROMPT + out + [4, 5]))
    assert turn["meta_info"]["cached_tokens"] == len(PROMPT) + len(out) - 1  # last not fed
    score = generate(engine, {"input_ids": PROMPT + out, "return_logprob": True,
                              "logprob_start_len": 12, "sampling_params": {"max_new_tokens": 0}})
    assert score["meta_info"]["cached_tokens"] == 12  # capped where the log-probs start
    got = torch.tensor([entry[0] for entry in score["meta_info"]["input_token_logprobs"][1:]])
    assert torch.allclose(got, ref[12:], atol=TOL, rtol=0)
    group = generate(engine, {"input_ids": [20, 21, 22, 23],
                              "sampling_params": {"n": 4, "max_new_tokens": 4}})
    assert [item["meta_info"]["cached_tokens"] for item in group] == [3] * 4
    assert call(engine, "/flush_cache", {})[0] == 200
    assert generate(engine, body)["meta_info"]["cached_tokens"] == 0


def kv_of(seq):
    """A stand-in for a model's KV: position t depends on tokens 0..t only, as in a causal LM."""
    rows = [torch.randn(2, 2, 1, 3, generator=torch.Generator().manual_seed(hash(tuple(seq[:t]))))
            for t in range(1, len(seq) + 1)]
    return torch.stack(rows, dim=3)


def routes_of(seq):
    """A stand-in for a token's routes: its id and position, so a wrong slice shows."""
    return torch.tensor([[[t, i]] for i, t in enumerate(seq)])


@pytest.mark.parametrize("capacity", [10_000, 60])
def test_prefix_cache_against_a_brute_force_scan(capacity):
    """The radix tree returns the longest stored prefix (all of them while nothing is evicted)
    with its exact KV and routes, and evicts least recently used runs to stay within its capacity."""
    g = torch.Generator().manual_seed(0)
    cache, stored = PrefixCache(capacity), []
    for _ in range(60):
        n = int(torch.randint(1, 9, (1,), generator=g))
        seq = [int(t) for t in torch.randint(0, 3, (n,), generator=g)]
        length, kv, routes = cache.match(seq, n - 1)
        best = max([0] + [next((i for i, (a, b) in enumerate(zip(seq[:n - 1], old)) if a != b),
                               min(n - 1, len(old))) for old in stored])
        assert length == best if capacity > 1000 else length <= best
        if length:
            assert torch.equal(kv, kv_of(seq)[:, :, :, :length])
            assert torch.equal(routes, routes_of(seq)[:length])
        cache.insert(seq, kv_of(seq), routes_of(seq))
        stored.append(seq)
        assert cache.size <= capacity


def test_token_texts_in_logprobs(engine, tiny_moe_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_moe_dir)
    res = generate(engine, {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 0,
                            "top_logprobs_num": 2, "return_text_in_logprobs": True,
                            "sampling_params": {"max_new_tokens": 3}})
    meta = res["meta_info"]
    rows = [meta["input_token_logprobs"], meta["output_token_logprobs"]] + [
        row for row in meta["input_top_logprobs"] + meta["output_top_logprobs"] if row]
    for entry in (entry for row in rows for entry in row):
        assert entry[2] == tokenizer.decode([entry[1]])
    plain = generate(engine, {"input_ids": PROMPT, "return_logprob": True,
                              "sampling_params": {"max_new_tokens": 3}})
    assert all(entry[2] is None for entry in plain["meta_info"]["output_token_logprobs"])


@pytest.mark.parametrize("body, field", [
    ({"text": "hello"}, "'text'"),
    ({"input_ids": [5], "stream": True}, "'stream'"),
    ({"input_ids": [5], "return_hidden_states": True}, "--enable-return-hidden-states"),
    ({"input_ids": [5], "sampling_params": {"min_p": 0.5}}, "'sampling_params.min_p'"),
    ({"input_ids": [5], "sampling_params": {"json_schema": "{}"}}, "'sampling_params.json_schema'"),
])
def test_what_the_cpu_engine_does_not_do_is_a_400_naming_the_field(engine, body, field):
    status, reply = call(engine, "/generate", body)
    assert status == 400 and field in reply["error"]["message"]


def test_pause_in_place_as_the_pause_kit_with_a_weight_update(engine, tiny_moe_dir):
    """Paused in place, running requests make no progress and new ones wait; a weight update
    runs meanwhile (the cache cannot be flushed while requests hold it); after
    continue_generation everything completes."""
    thread, box = long_batch(engine, "inplace")
    assert call(engine, "/pause_generation", {"mode": "in_place"}) == (
        200, {"message": "Generation paused successfully.", "status": "ok"})
    time.sleep(0.5)
    assert thread.is_alive() and running(engine) == 16
    waiting, waited = in_thread(generate, engine, {"input_ids": [5, 6],
                                                   "sampling_params": {"max_new_tokens": 4}})
    status, reply = call(engine, "/update_weights_from_disk", {
        "model_path": str(tiny_moe_dir), "weight_version": "while-paused", "flush_cache": False})
    assert (status, reply["success"]) == (200, True)
    assert call(engine, "/flush_cache", {}) == (400, "Flush cache failed.\n")
    status, reply = call(engine, "/update_weights_from_disk", {"model_path": str(tiny_moe_dir)})
    assert (status, reply["success"]) == (400, False) and "not flushed" in reply["message"]
    assert thread.is_alive() and waiting.is_alive()
    assert call(engine, "/continue_generation", {})[0] == 200
    thread.join(60), waiting.join(60)
    assert [item["meta_info"]["completion_tokens"] for item in box[0]] == [100] * 16
    assert box[0][0]["meta_info"]["weight_version"] == "while-paused"
    assert waited[0]["meta_info"]["finish_reason"]["type"] in ("stop", "length")


def test_abort_as_the_abort_kit_and_pause_abort(engine):
    """abort_request (all, or by rid prefix) ends running and queued requests with
    finish_reason abort; pause_generation's default mode aborts everything, then holds."""
    thread, box = long_batch(engine, "victim")
    assert call(engine, "/abort_request", {"rid": "victim_1"}) == (200, "")  # victim_1, _10..15
    assert call(engine, "/abort_request", {"abort_all": True}) == (200, "")
    thread.join(60)
    assert {item["meta_info"]["finish_reason"]["type"] for item in box[0]} == {"abort"}
    assert call(engine, "/health")[0] == 200
    thread, box = long_batch(engine, "paused")
    assert call(engine, "/pause_generation", {})[0] == 200  # returns once nothing runs
    assert running(engine) == 0
    thread.join(60)
    assert {item["meta_info"]["finish_reason"]["type"] for item in box[0]} == {"abort"}
    queued, result = in_thread(generate, engine, {"input_ids": [5, 6], "rid": "late",
                                                  "sampling_params": {"max_new_tokens": 4}})
    time.sleep(0.3)
    assert queued.is_alive()
    assert call(engine, "/continue_generation", {})[0] == 200
    queued.join(60)
    assert result[0]["meta_info"]["id"] == "late"


def test_memory_release_and_resume(engine):
    """SGLang's replies (null, 200); release needs an idle server; on CPU only the kv_cache
    tag frees anything (the prefix cache)."""
    generate(engine, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}})
    assert call(engine, "/release_memory_occupation", {"tags": ["kv_cache"]}) == (200, None)
    assert call(engine, "/resume_memory_occupation", {"tags": ["kv_cache"]}) == (200, None)
    again = generate(engine, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}})
    assert again["meta_info"]["cached_tokens"] == 0  # released with the KV cache
    assert call(engine, "/release_memory_occupation", {}) == (200, None)
    assert call(engine, "/resume_memory_occupation", {}) == (200, None)
    assert call(engine, "/resume_memory_occupation", {})[0] == 400  # nothing released
    thread, _ = long_batch(engine, "busy")
    assert call(engine, "/pause_generation", {"mode": "in_place"})[0] == 200
    status, reply = call(engine, "/release_memory_occupation", {})
    assert status == 400 and "only when server is idle" in reply["error"]["message"]
    assert call(engine, "/continue_generation", {})[0] == 200
    thread.join(60)


def test_update_weights_from_disk_as_sglang(engine, tiny_moe_dir, tmp_path):
    """SGLang's TestServerUpdateWeightsFromDisk: success moves model_path and the output,
    reverting restores both; a missing checkpoint is success false (400) and changes nothing;
    abort_all_requests ends the running requests with abort."""
    state = load_file(str(tiny_moe_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    other = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in sorted(state.items())}
    new_path = str(write_hf_checkpoint([list(other.items())], tmp_path / "other", tiny_moe_dir))
    body = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 12,
                                                     "ignore_eos": True}}
    origin, origin_path = generate(engine, body)["output_ids"], str(tiny_moe_dir)
    assert call(engine, "/model_info")[1]["model_path"] == origin_path
    status, reply = call(engine, "/update_weights_from_disk", {"model_path": new_path})
    assert status == 200 and reply == {"success": True, "num_paused_requests": 0,
                                       "message": "Succeeded to update model weights."}
    assert call(engine, "/get_model_info")[1]["model_path"] == new_path
    assert generate(engine, body)["output_ids"] != origin
    status, reply = call(engine, "/update_weights_from_disk", {"model_path": new_path + "wrong"})
    assert status == 400 and reply["success"] is False and "num_paused_requests" in reply
    assert call(engine, "/model_info")[1]["model_path"] == new_path
    thread, box = long_batch(engine, "during-update")
    status, reply = call(engine, "/update_weights_from_disk", {
        "model_path": origin_path, "abort_all_requests": True, "weight_version": "back"})
    assert status == 200 and reply["message"].endswith("Weight version updated to back.")
    thread.join(60)
    assert {item["meta_info"]["finish_reason"]["type"] for item in box[0]} == {"abort"}
    assert generate(engine, body)["output_ids"] == origin
    assert call(engine, "/model_info")[1]["weight_version"] == "back"


def test_info_routes_as_the_basic_api_contract_kit(engine, tiny_moe_dir):
    api = load_api_types()
    assert call(engine, "/health") == (200, "") and call(engine, "/health_generate") == (200, "")
    for path in ("/server_info", "/get_server_info"):
        status, info = call(engine, path)
        decoded = api.GetServerInfoResponse.from_json_value(info)
        assert status == 200 and decoded.version == "0.5.23"
        assert decoded.max_total_num_tokens > 0 and decoded.model_path == str(tiny_moe_dir)
    for path in ("/model_info", "/get_model_info"):
        status, info = call(engine, path)
        assert status == 200 and api.GetModelInfoResponse.from_json_value(info).model_path
    assert call(engine, "/no_such_route")[0] == 404
