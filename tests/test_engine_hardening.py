"""The embedded engine's HTTP server under abuse: it answers every bad request and keeps serving.

One engine (a 4 KiB request limit, so the limit itself can be tested exactly) gets oversized
and lying bodies (413 before reading, 400), sampling values that SGLang 0.5.23's
`SamplingParams.verify` rejects (400 with its message, naming the field) and a burst of
concurrent clients (loopback, bounded in count and time). After each, /health answers.
"""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest

from mopd_megatron.config import EngineConfig
from mopd_megatron.rollout import start_engine

LIMIT = 4096


@pytest.fixture(scope="module")
def engine(tiny_moe_dir, tmp_path_factory):
    cfg = EngineConfig(engine="local", extra_args=["--max-request-bytes", str(LIMIT)])
    with start_engine(cfg, str(tiny_moe_dir), tmp_path_factory.mktemp("logs"), "hard") as handle:
        yield handle.url


def call(url, path, body=None, timeout=30):
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data),
                                    timeout=timeout) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def raw(url, head, body=b"", close_write=False):
    """Send raw bytes on one connection; return the status line and the body of the reply."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    status, _, rest = reply.partition(b"\r\n")
    return status.decode(), rest.partition(b"\r\n\r\n")[2].decode()


def healthy(url):
    return call(url, "/health") == (200, "")


def test_bodies_over_the_limit_get_413_before_they_are_read(engine):
    tic = time.monotonic()
    status, body = raw(engine, "POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824",
                       b'{"input_ids": [')  # claims 1 GiB, sends 15 bytes
    assert status.split()[1] == "413" and "1073741824 bytes is over the limit" in body
    assert time.monotonic() - tic < 5
    padding = " " * (LIMIT - 60)
    assert call(engine, "/generate", f'{{"input_ids": [5]{padding}}}'.encode())[0] == 400  # fits
    assert call(engine, "/generate", f'{{"input_ids": [5]{padding * 2}}}'.encode())[0] == 413
    assert healthy(engine)


@pytest.mark.parametrize("head, body, problem", [
    ("Content-Length: 100", b'{"input_ids"', "body ended after 12 of 100 bytes"),
    ("Content-Length: abc", b"", "Content-Length is not a number"),
    ("Content-Length: -4", b"", "Content-Length is negative"),
    ("Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n", "chunked request bodies"),
    ("Content-Length: 9", b"not json!", "body is not JSON"),
])
def test_lying_or_broken_bodies_get_400(engine, head, body, problem):
    status, reply = raw(engine, f"POST /generate HTTP/1.1\r\nHost: x\r\n{head}", body,
                        close_write=True)
    assert status.split()[1] == "400" and problem in reply
    assert healthy(engine)


@pytest.mark.parametrize("sampling, message", [  # SGLang 0.5.23 SamplingParams.verify's text
    ({"max_new_tokens": -5}, "max_new_tokens must be at least 0, got -5."),
    ({"temperature": -1}, "temperature must be a non-negative finite number, got -1"),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
    ({"top_k": 0}, "top_k must be -1 (disable) or at least 1, got 0."),
    ({"min_p": 2.0}, "min_p must be in [0, 1], got 2.0."),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be in (0, 2]"),
    ({"frequency_penalty": 3.0}, "frequency_penalty must be in [-2, 2], got 3.0."),
    ({"min_new_tokens": 9, "max_new_tokens": 4},
     "min_new_tokens must be in [0, max_new_tokens(4)], got 9."),
    ({"stop": ["x"] * 33}, "at most 32 stop strings are allowed, got 33"),
    ({"stop_regex": "("}, "invalid stop_regex '('"),
    ({"n": 0}, "n must be at least 1, got 0."),
])
def test_sampling_values_sglang_rejects_get_400_naming_the_field(engine, sampling, message):
    status, reply = call(engine, "/generate", {"input_ids": [5, 6], "sampling_params": sampling})
    assert status == 400 and message in json.loads(reply)["error"]["message"]
    assert healthy(engine)


@pytest.mark.parametrize("body", [
    '{"input_ids": "abc"}', '{"input_ids": [5], "sampling_params": 5}', "[1, 2]", "null",
    '{"input_ids": [[5], 6]}', '{"input_ids": [5], "sampling_params": {"max_tokens": 3}}',
])
def test_contract_violations_get_400_with_sglang_shape(engine, body):
    status, reply = call(engine, "/generate", body.encode())
    assert status == 400 and isinstance(json.loads(reply)["error"], str)  # {"error": "<text>"}
    assert healthy(engine)


def test_bad_bodies_on_control_routes_get_400(engine):
    status, reply = call(engine, "/update_weights_from_disk", {"model_path": 5})
    assert status == 400 and json.loads(reply)["message"] == "'model_path': expected str, got 5"
    assert call(engine, "/abort_request", b"[]")[0] == 400
    assert call(engine, "/pause_generation", {"mode": "retract"})[0] == 400
    assert healthy(engine)


def test_a_burst_of_concurrent_clients_is_served(engine):
    """24 clients for up to 3 s (at most 40 requests each), generating and polling health:
    every request is answered 200 (SGLang's listen backlog is large; socketserver's 5 was
    not), and the server serves on afterwards."""
    replies, errors, stop_at = [], [], time.monotonic() + 3

    def client(i):
        for k in range(40):
            if time.monotonic() > stop_at:
                return
            try:
                if k % 2:
                    replies.append(call(engine, "/health")[0])
                else:
                    replies.append(call(engine, "/generate", {
                        "input_ids": [5, 6, i % 30 + 3], "sampling_params": {"max_new_tokens": 2}
                    })[0])
            except OSError as err:
                errors.append(repr(err))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(replies) >= 48 and set(replies) == {200}
    assert healthy(engine)
    status, reply = call(engine, "/generate", {"input_ids": [5], "sampling_params": {
        "max_new_tokens": 1}})
    assert status == 200 and json.loads(reply)["meta_info"]["completion_tokens"] == 1
