"""Fault injection: a small real HTTP server that misbehaves on purpose, one way per test.

Each fault gives bounded retries (1 + max_retries attempts, counted on the server side) and
then an `EngineError` that names the endpoint URL and the problem; nothing is shortened or
zero-filled. A server error that clears up within the retries is survived.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mopd_megatron.rollout import EngineClient, EngineError, SamplingParams
from mopd_megatron.rollout.sglang import free_port

RETRIES = 2


def good_reply(body):
    """A well-formed SGLang reply: one output token (id 7, log-prob -0.5) per sequence."""
    out = []
    for ids in body["input_ids"]:
        start = (body.get("logprob_start_len") or [0] * len(body["input_ids"]))[len(out)]
        meta = {"finish_reason": {"type": "length", "length": 1},
                "output_token_logprobs": [[-0.5, 7, None]],
                "input_token_logprobs": [[None, ids[start], None]]
                + [[-1.0, t, None] for t in ids[start + 1:]]}
        out.append({"text": "", "output_ids": [7], "meta_info": meta})
    return out


FAULTS = {
    "ok": lambda body: (200, json.dumps(good_reply(body))),
    "malformed": lambda body: (200, '[{"output_ids": [7], "meta_info": {'),
    "short_logprobs": lambda body: (200, json.dumps(
        [dict(r, output_ids=[7, 8]) for r in good_reply(body)])),
    "nan": lambda body: (200, json.dumps(good_reply(body)).replace("-0.5", "NaN")),
    "missing_items": lambda body: (200, json.dumps(good_reply(body)[:-1])),
    "wrong_token": lambda body: (200, json.dumps(good_reply(body)).replace(", 7, null",
                                                                           ", 9, null")),
    "http500": lambda body: (500, "internal error: out of memory"),
    "http400": lambda body: (400, '{"error": "bad request"}'),
}


class FaultServer(ThreadingHTTPServer):
    daemon_threads = True
    mode, hits, delay_s, fail_first = "ok", 0, 0.0, 0


class FaultHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        srv = self.server
        srv.hits += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(srv.delay_s)
        mode = "http500" if srv.hits <= srv.fail_first else srv.mode
        status, text = FAULTS[mode](body)
        data = text.encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass


@pytest.fixture(scope="module")
def server():
    srv = FaultServer(("127.0.0.1", 0), FaultHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


@pytest.fixture
def fault(server):
    """Set the server's behaviour; return (client, server)."""
    def configure(mode="ok", delay_s=0.0, fail_first=0, timeout_s=5.0):
        server.mode, server.hits, server.delay_s, server.fail_first = mode, 0, delay_s, fail_first
        url = f"http://127.0.0.1:{server.server_address[1]}"
        return EngineClient(url, timeout_s=timeout_s, max_retries=RETRIES, backoff_s=0.01), server
    return configure


PROMPTS = [[3, 4, 5], [6, 7]]
SAMPLING = SamplingParams(max_new_tokens=4)


@pytest.mark.parametrize("mode, problem", [
    ("malformed", "malformed JSON"),
    ("short_logprobs", "output_token_logprobs has 1 entries for 2 output_ids"),
    ("nan", "non-finite log-prob nan"),
    ("missing_items", "expected a list of 2 results"),
    ("wrong_token", "log-prob is for token 9, expected 7"),
    ("http500", "HTTP 500 from /generate: internal error: out of memory"),
])
def test_fault_gives_bounded_retries_then_a_named_error(fault, mode, problem):
    client, server = fault(mode)
    with pytest.raises(EngineError) as err:
        client.generate(PROMPTS, SAMPLING)
    assert problem in str(err.value) and client.url in str(err.value)
    assert err.value.attempts == server.hits == 1 + RETRIES


def test_slow_server_times_out(fault):
    client, _ = fault("ok", delay_s=0.6, timeout_s=0.2)
    with pytest.raises(EngineError, match=r"within 0.2 s \(timeout\)") as err:
        client.generate(PROMPTS, SAMPLING)
    assert err.value.attempts == 1 + RETRIES and client.url in str(err.value)


def test_server_down():
    url = f"http://127.0.0.1:{free_port()}"
    client = EngineClient(url, max_retries=RETRIES, backoff_s=0.01)
    with pytest.raises(EngineError, match="server down or unreachable") as err:
        client.score([[3, 4, 5]], [1])
    assert err.value.attempts == 1 + RETRIES and url in str(err.value)
    assert not client.health()


def test_client_errors_are_not_retried(fault):
    client, server = fault("http400")
    with pytest.raises(EngineError, match="HTTP 400"):
        client.generate(PROMPTS, SAMPLING)
    assert server.hits == 1


def test_transient_errors_within_the_retries_are_survived(fault):
    client, server = fault("ok", fail_first=RETRIES)
    gens = client.generate(PROMPTS, SAMPLING)
    assert [g.output_ids for g in gens] == [[7], [7]] and server.hits == 1 + RETRIES
    client, _ = fault("ok")
    scores = client.score([[3, 4, 5, 6]], [2])
    assert scores[0].token_logprobs == [-1.0, -1.0]


# -- malformed replies of every shape (teacher scoring and rollout) --------------------------

SCORE_SEQS, SCORE_STARTS, TOP_K = [[3, 4, 5, 6], [6, 7, 8]], [2, 1], 2


def score_reply(body):
    """A well-formed prefill-scoring reply with top-k rows (what a teacher returns)."""
    out = []
    for ids, start in zip(body["input_ids"], body["logprob_start_len"]):
        rows = [[[-0.5, 9, None], [-1.5, 10, None]] for _ in ids[start + 1:]]
        meta = {"finish_reason": {"type": "length", "length": 0}, "output_token_logprobs": [],
                "input_token_logprobs": [[None, ids[start], None]]
                + [[-1.0, t, None] for t in ids[start + 1:]],
                "input_top_logprobs": [None] + rows}
        out.append({"text": "", "output_ids": [], "meta_info": meta})
    return out


def mutations(value, path=()):
    """Every one-node change of a JSON tree into a wrong shape: a node replaced by a null, a
    string, a bool, an empty list or object; a key dropped; a list cut short or grown."""
    for wrong in (None, "x", True, [], {}, [None]):
        yield path, ("set", wrong)
    if isinstance(value, dict):
        for key, item in value.items():
            yield path, ("drop", key)
            yield from mutations(item, path + (key,))
    if isinstance(value, list) and value:
        yield path, ("cut", None)
        yield path, ("grow", None)
        for i, item in enumerate(value):
            yield from mutations(item, path + (i,))


def mutate(tree, path, change):
    tree = json.loads(json.dumps(tree))
    if not path and change[0] == "set":
        return change[1]
    parent = tree
    for key in path[:-1] if change[0] == "set" else path:
        parent = parent[key]
    kind, arg = change
    if kind == "set":
        parent[path[-1]] = arg
    elif kind == "drop":
        del parent[arg]
    elif kind == "cut":
        parent.pop()
    else:
        parent.append(parent[-1])
    return tree


class CannedClient(EngineClient):
    """A client whose server always sends the same reply bytes (no sockets)."""

    def __init__(self, reply, **kwargs):
        super().__init__("http://teacher.invalid:1", max_retries=1, backoff_s=0.0, **kwargs)
        self.reply, self.calls = reply, 0

    async def _http(self, method, path, body):
        self.calls += 1
        return 200, json.dumps(self.reply).encode()


@pytest.mark.parametrize("call", ["generate", "score"])
def test_every_malformed_reply_is_a_retried_engine_error(call):
    """Each one-node change of a good reply either leaves the parsed result as it was (a field
    the client does not read) or raises EngineError naming the endpoint, after a retry; never
    a bare TypeError or KeyError, never a silently different result."""
    if call == "generate":
        run = lambda c: c.generate(PROMPTS, SAMPLING)  # noqa: E731
        good = good_reply({"input_ids": PROMPTS})
    else:
        run = lambda c: c.score(SCORE_SEQS, SCORE_STARTS, top_k=TOP_K)  # noqa: E731
        good = score_reply({"input_ids": SCORE_SEQS,
                            "logprob_start_len": [r - 1 for r in SCORE_STARTS]})
    expected = run(CannedClient(good))
    refused = 0
    for path, change in mutations(good):
        client = CannedClient(mutate(good, path, change))
        try:
            assert run(client) == expected, (path, change)
        except EngineError as err:
            assert err.url == client.url and "/generate" in str(err), (path, change, err)
            assert err.attempts == client.calls == 2, (path, change)
            refused += 1
    assert refused > 100  # most changes break something the client reads


class OlderServer(EngineClient):
    """A client facing an SGLang older than 0.5.23 (no /model_info, /server_info, no weight
    update sessions): every new route answers 404, as FastAPI does for an unknown path."""

    NEW = {"/model_info", "/server_info", "/begin_weight_update", "/end_weight_update"}

    def __init__(self):
        super().__init__("http://old-sglang.invalid:1", max_retries=0)
        self.paths = []

    async def _http(self, method, path, body):
        self.paths.append(path)
        if path in self.NEW:
            return 404, b'{"detail": "Not Found"}'
        return 200, json.dumps({"model_path": "/m", "tp_size": 1, "success": True,
                                "message": "Succeeded to update model weights."}).encode()


def test_older_servers_get_the_deprecated_routes_and_no_session():
    client = OlderServer()
    assert client.model_info()["model_path"] == "/m" and client.server_info()["tp_size"] == 1
    with client.weight_update_session():
        client.update_weights_from_disk("/m")
    assert client.paths == ["/model_info", "/get_model_info", "/server_info", "/get_server_info",
                            "/begin_weight_update", "/update_weights_from_disk"]
