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
    "wrong_token": lambda body: (200, json.dumps(good_reply(body)).replace(", 7, null", ", 9, null")),
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
