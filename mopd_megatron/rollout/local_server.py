"""Rollout stage, embedded CPU engine: SGLang 0.5.23's HTTP API over a transformers model.

    python -m mopd_megatron.rollout.local_server --model-path DIR --host 127.0.0.1 --port N
        [--num-threads 1] [--random-seed 0] [--max-running-requests 1024]
        [--max-total-tokens 32768] [--disable-radix-cache] [--max-request-bytes 536870912]
        [--enable-return-routed-experts] [--enable-return-hidden-states]

Consumes HTTP requests with SGLang's field names; produces SGLang's replies (bodies and status
codes), so the client, the teachers and the weight sync run unchanged against a real SGLang:

- POST /generate (`local_requests.py` admits it, `local_batch.py` runs it): token ids, single
  or batch; sampling temperature, top_p, top_k, max_new_tokens, stop, stop_token_ids,
  stop_regex (finish_reason.matched as SGLang), n, ignore_eos, no_stop_trim, sampling_seed;
  return_logprob, logprob_start_len, top_logprobs_num, token_ids_logprob,
  return_text_in_logprobs; with --enable-return-hidden-states, return_hidden_states
  (`local_payloads.py`, `local_hidden.py`); a prefix cache (meta_info.cached_tokens); with --enable-return-routed-experts, return_routed_experts
  and routed_experts_start_len (`local_routes.py`). Contract violations, bad values and what the CPU engine
  does not do (text input, streaming, penalties, grammars, ...) get HTTP 400 naming the field.
- Weight updates (`local_updates.py`): from disk; from tensor and from distributed only
  inside /begin_weight_update ... /end_weight_update; /init_weights_update_group,
  /destroy_weights_update_group; POST/GET /flush_cache.
- In-flight control (`local_scheduler.py`): /pause_generation (abort, in_place),
  /continue_generation, /abort_request; /release_memory_occupation and
  /resume_memory_occupation (on CPU only the kv_cache tag frees anything: the prefix cache).
- GET /health (200 once loaded), /health_generate, /model_info, /server_info (and the
  deprecated /get_model_info, /get_server_info).

The HTTP server holds many clients: a listen backlog of 1024, a thread per connection, a
socket timeout, and a body limit (HTTP 413 before reading); every failure is answered and
the server keeps serving.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from mopd_megatron.rollout.local_batch import BatchRunner
from mopd_megatron.rollout.local_engine import LocalModel
from mopd_megatron.rollout.local_prefix_cache import PrefixCache
from mopd_megatron.rollout.local_requests import BadRequest, SeqRequest, parse_generate
from mopd_megatron.rollout.local_routes import RouteRecorder
from mopd_megatron.rollout.local_scheduler import Scheduler
from mopd_megatron.rollout.local_updates import WeightUpdates, get_field
from mopd_megatron.rollout.tensor_payload import SAFETENSORS_B64

SGLANG_VERSION = "0.5.23"
"""The SGLang release whose HTTP API this engine follows (reported as `version`)."""
MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")


class EngineServer(ThreadingHTTPServer):
    """The HTTP server and the engine state its handlers share."""

    daemon_threads = True
    request_queue_size = 1024  # listen backlog: socketserver's default of 5 drops bursts

    def __init__(self, args: argparse.Namespace):
        self.args, self.max_body = args, args.max_request_bytes
        self.model = LocalModel(args.model_path)
        plain = self.model.cache_is_plain() and not args.disable_radix_cache
        self.cache = PrefixCache(args.max_total_tokens) if plain else None
        routes = RouteRecorder(self.model.model) if args.enable_return_routed_experts else None
        self.scheduler = Scheduler(BatchRunner(self.model, self.cache, args.random_seed, routes),
                                   args.max_running_requests)
        self.updates = WeightUpdates(self.model, self.scheduler, self.flush)
        self.released: set[str] = set()
        self.startup_time = time.time()
        super().__init__((args.host, args.port), Handler)  # listen once the model is loaded

    def flush(self) -> bool:
        """Drop the prefix cache (SGLang refuses while requests run)."""
        if not self.scheduler.idle():
            return False
        if self.cache is not None:
            self.cache.clear()
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-reply; the handler already answered what it could


class Handler(BaseHTTPRequestHandler):
    """Routes SGLang endpoints to the engine."""

    server: EngineServer
    timeout = 120  # seconds a stalled client may hold its connection's thread

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch({
            "/health": lambda: "", "/health_generate": self._health_generate,
            "/model_info": self._model_info, "/get_model_info": self._model_info,
            "/server_info": self._server_info, "/get_server_info": self._server_info,
            "/flush_cache": self._flush, "/release_memory_occupation": self._release,
            "/resume_memory_occupation": self._resume})

    def do_POST(self) -> None:
        updates = self.server.updates
        self._dispatch({
            "/generate": self._generate, "/flush_cache": self._flush,
            "/abort_request": self._abort, "/pause_generation": self._pause,
            "/continue_generation": self._continue,
            "/release_memory_occupation": self._release, "/resume_memory_occupation": self._resume,
            "/begin_weight_update": lambda: updates.begin(self._body()),
            "/end_weight_update": lambda: updates.end(self._body()),
            "/update_weights_from_disk": lambda: updates.from_disk(self._body()),
            "/update_weights_from_tensor": lambda: updates.from_tensor(self._body()),
            "/update_weights_from_distributed": lambda: updates.from_distributed(self._body()),
            "/init_weights_update_group": lambda: updates.init_group(self._body()),
            "/destroy_weights_update_group": lambda: updates.destroy_group(self._body())})

    # -- plumbing ---------------------------------------------------------------------------

    def _dispatch(self, routes: dict[str, Callable[[], Any]]) -> None:
        route = routes.get(self.path.split("?")[0])
        try:
            if route is None:
                return self._reply(404, {"detail": "Not Found"})
            reply = route()
            status, content = reply if isinstance(reply, tuple) else (200, reply)
            self._reply(status, content)
        except BadRequest as err:
            self.close_connection = True  # a body may be left unread
            self._reply(err.status, err.body)
        except Exception as err:  # noqa: BLE001 - report, keep serving
            self._reply(500, {"error": {"message": f"{type(err).__name__}: {err}"}})

    def _reply(self, status: int, content: Any) -> None:
        text = isinstance(content, str)
        data = content.encode() if text else json.dumps(content).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client is gone
            self.close_connection = True

    def _body(self) -> Any:
        """The JSON body, read only when Content-Length is within the limit."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise BadRequest("chunked request bodies are not supported: send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if length < 0:
            raise BadRequest("Content-Length is negative")
        if length > self.server.max_body:
            raise BadRequest(f"request body of {length} bytes is over the limit of "
                             f"{self.server.max_body} bytes (--max-request-bytes)", status=413)
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise BadRequest(f"body ended after {len(raw)} of {length} bytes")
        try:
            return json.loads(raw or b"{}")
        except ValueError as err:
            raise BadRequest(f"body is not JSON: {err}") from None

    # -- generation and control -------------------------------------------------------------

    def _generate(self) -> Any:
        model = self.server.model
        seqs, many = parse_generate(self._body(), model.vocab_size,
                                    model.model.config.max_position_embeddings, model.tokenizer,
                                    self.server.args.enable_return_hidden_states)
        tic = time.perf_counter()
        results = self.server.scheduler.generate(seqs)
        for res in results:
            res["meta_info"]["e2e_latency"] = time.perf_counter() - tic
        return results if many else results[0]

    def _health_generate(self) -> str:
        self.server.scheduler.generate([SeqRequest([0], max_new_tokens=1, top_k=1)])
        return ""

    def _flush(self) -> tuple[int, str]:
        if self.server.scheduler.control(self.server.flush):
            return 200, ("Cache flushed.\nPlease check backend logs for more details. (When "
                         "there are running or waiting requests, the operation will not be "
                         "performed.)\n")
        return 400, "Flush cache failed.\n"

    def _abort(self) -> str:
        body = self._body()
        self.server.scheduler.abort(get_field(body, "rid", str, ""),
                                    get_field(body, "abort_all", bool, False))
        return ""

    def _pause(self) -> dict:
        self.server.scheduler.pause(get_field(self._body(), "mode", str, "abort"))
        return {"message": "Generation paused successfully.", "status": "ok"}

    def _continue(self) -> dict:
        self._body()
        self.server.scheduler.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}

    def _memory_tags(self) -> list[str]:
        body = self._body() if self.command == "POST" else {}
        tags = get_field(body, "tags", (list, type(None)), None)
        return list(tags or MEMORY_TAGS)

    def _release(self) -> None:
        """Nothing to free on CPU but the prefix cache (tag kv_cache); SGLang's replies."""
        tags = self._memory_tags()

        def release() -> None:
            if not self.server.scheduler.idle():
                raise BadRequest("release_memory_occupation should be called only when "
                                 "server is idle.")
            if "kv_cache" in tags:
                self.server.flush()
            self.server.released.update(tags)
        return self.server.scheduler.control(release)

    def _resume(self) -> None:
        tags = self._memory_tags()

        def resume() -> None:
            missing = sorted(set(tags) - self.server.released)
            if missing:
                raise BadRequest(f"memory of {missing} was not released")
            self.server.released -= set(tags)
        return self.server.scheduler.control(resume)

    # -- information ------------------------------------------------------------------------

    def _model_info(self) -> dict:
        model = self.server.model
        config = model.model.config
        return {"model_path": model.model_path, "served_model_name": model.model_path,
                "tokenizer_path": self.server.args.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": model.weight_version,
                "load_format": "auto", "reasoning_parser": None, "tool_call_parser": None,
                "disaggregation_mode": "null", "has_image_understanding": False,
                "has_audio_understanding": False, "model_type": config.model_type,
                "architectures": config.architectures}

    def _server_info(self) -> dict:
        server, args = self.server, self.server.args
        context = server.model.model.config.max_position_embeddings
        return {
            "model_path": server.model.model_path, "served_model_name": args.model_path,
            "tokenizer_path": args.model_path, "host": args.host,
            "port": server.server_address[1], "tp_size": 1, "dp_size": 1, "ep_size": 1,
            "random_seed": args.random_seed, "max_running_requests": args.max_running_requests,
            "max_total_tokens": args.max_total_tokens,
            "disable_radix_cache": server.cache is None, "context_length": context,
            "enable_return_routed_experts": args.enable_return_routed_experts,
            "enable_return_hidden_states": args.enable_return_hidden_states,
            "status": "ready", "max_total_num_tokens": args.max_total_tokens,
            "max_req_input_len": context - 1, "max_context_length": context,
            "startup_time": server.startup_time, "version": SGLANG_VERSION, "frontend": "python",
            "internal_states": [dict(server.scheduler.counts(), paused=server.scheduler.paused,
                                     cached_tokens=server.cache.size if server.cache else 0)],
            "engine": "mopd-megatron embedded CPU engine",
            "num_threads": torch.get_num_threads(),
            "update_weights_from_tensor_formats": [SAFETENSORS_B64]}


def main(argv: list[str] | None = None) -> None:
    """Command line entry point (flags named as SGLang's launch_server)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--num-threads", type=int, default=1,
                        help="torch intra-op threads (tiny models are fastest on 1; 0 = torch's "
                             "default)")
    parser.add_argument("--random-seed", type=int, default=0)
    parser.add_argument("--max-running-requests", type=int, default=1024)
    parser.add_argument("--max-total-tokens", type=int, default=32768,
                        help="tokens the prefix cache holds")
    parser.add_argument("--disable-radix-cache", action="store_true")
    parser.add_argument("--enable-return-routed-experts", action="store_true",
                        help="record every token's routed experts (MoE models) so requests "
                             "with return_routed_experts get them")
    parser.add_argument("--enable-return-hidden-states", action="store_true",
                        help="allow return_hidden_states (teachers' hidden-state payload)")
    parser.add_argument("--max-request-bytes", type=int, default=512 << 20,
                        help="largest request body; larger ones get HTTP 413")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    server = EngineServer(args)
    print(f"embedded engine serving {args.model_path} at http://{args.host}:"
          f"{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
