"""Rollout stage, embedded CPU engine: SGLang's HTTP API subset over a transformers model.

    python -m mopd_megatron.rollout.local_server --model-path DIR --host 127.0.0.1 --port N
        [--num-threads 1] [--random-seed 0] [--max-running-requests 1024]

Consumes HTTP requests with SGLang's field names and produces SGLang's response shapes, so
the client, the teachers and the weight sync run unchanged against a real SGLang server:
POST /generate (single or batch `input_ids`; `sampling_params` temperature, top_p, top_k,
max_new_tokens, stop_token_ids, ignore_eos; `return_logprob`, `logprob_start_len`,
`top_logprobs_num`; prefill-only scoring with max_new_tokens=0), /update_weights_from_disk,
/update_weights_from_tensor, /flush_cache; GET /health (200 once the model is loaded),
/health_generate, /get_model_info, /get_server_info. Every /generate body is decoded with
SGLang's own contract (`GenerateRequest.from_json_value`) and refused with 400 as SGLang
does; requests that arrive together are merged into one model batch (up to
--max-running-requests sequences), and weight updates run between batches
(`local_scheduler.py`).

Where it differs from SGLang:
- token ids only (no `text` input, no streaming, no `n`, penalties, min_p, grammar,
  per-request seeds): such requests get HTTP 400 naming the field;
- output log-probs are those of the temperature-scaled distribution before top-k/top-p
  truncation (SGLang's default), unscaled for greedy; input log-probs are at temperature 1;
- /update_weights_from_tensor takes `load_format: "safetensors_b64"` with one base64
  safetensors payload (HF checkpoint names) in `serialized_named_tensors`, not SGLang's
  pickled CUDA IPC handles; /get_server_info advertises it under
  `update_weights_from_tensor_formats`;
- /init_weights_update_group takes backend 'gloo' only (CPU tensors; 'nccl' gets 400),
  then /update_weights_from_distributed receives the broadcasts as SGLang does;
- there is no prefix cache, so /flush_cache has nothing to drop.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors

from mopd_megatron.rollout.local_engine import LocalModel, SeqRequest
from mopd_megatron.rollout.local_scheduler import BadRequest, Scheduler, parse_generate
from mopd_megatron.rollout.process_group import init_custom_process_group


class Handler(BaseHTTPRequestHandler):
    """Routes SGLang endpoints to the engine (set as class attributes by `serve`)."""

    engine: LocalModel
    scheduler: Scheduler
    server_args: dict
    groups: ClassVar[dict[str, dist.ProcessGroup]] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, content: Any) -> None:
        data = content.encode() if isinstance(content, str) else json.dumps(content).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if isinstance(content, str)
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        routes = {"/health": lambda: "", "/health_generate": self._health_generate,
                  "/get_model_info": self._model_info, "/model_info": self._model_info,
                  "/get_server_info": lambda: self.server_args,
                  "/server_info": lambda: self.server_args, "/flush_cache": self._flush}
        self._dispatch(routes)

    def do_POST(self) -> None:
        routes = {"/generate": self._generate, "/flush_cache": self._flush,
                  "/update_weights_from_disk": self._from_disk,
                  "/update_weights_from_tensor": self._from_tensor,
                  "/init_weights_update_group": self._init_group,
                  "/update_weights_from_distributed": self._from_distributed}
        self._dispatch(routes)

    def _dispatch(self, routes: dict[str, Callable[[], Any]]) -> None:
        route = routes.get(self.path.split("?")[0])
        if route is None:
            return self._reply(404, {"error": f"no route {self.command} {self.path}"})
        try:
            self._reply(200, route())
        except BadRequest as err:
            self._reply(400, {"error": {"message": str(err), "code": 400}})
        except Exception as err:  # noqa: BLE001 - report, keep serving
            self._reply(500, {"error": {"message": f"{type(err).__name__}: {err}", "code": 500}})

    def _body(self) -> Any:
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            return json.loads(raw or b"{}")
        except ValueError as err:
            raise BadRequest(f"body is not JSON: {err}") from None

    def _generate(self) -> Any:
        config = self.engine.model.config
        seqs, batch = parse_generate(self._body(), self.engine.vocab_size,
                                     config.max_position_embeddings)
        tic = time.perf_counter()
        results = self.scheduler.submit(seqs)
        for res in results:
            res["meta_info"]["e2e_latency"] = time.perf_counter() - tic
        return results if batch else results[0]

    def _flush(self) -> str:
        return "Cache flushed.\n"  # no prefix cache to drop

    def _health_generate(self) -> str:
        self.scheduler.submit([SeqRequest([0], max_new_tokens=1, temperature=0.0)])
        return ""

    def _model_info(self) -> dict:
        config = self.engine.model.config
        return {"model_path": self.engine.model_path, "tokenizer_path": self.engine.model_path,
                "is_generation": True, "weight_version": self.engine.weight_version,
                "model_type": config.model_type, "architectures": config.architectures}

    def _update(self, load: Callable[[], None], body: dict) -> dict:
        def run() -> dict:
            try:
                load()
            except ValueError as err:
                raise BadRequest(f"weights not updated: {err}") from None
            if body.get("weight_version") is not None:
                self.engine.weight_version = str(body["weight_version"])
            return {"success": True, "message": "Succeeded to update model weights.",
                    "num_paused_requests": 0}
        return self.scheduler.submit(run)

    def _from_disk(self) -> dict:
        body = self._body()
        if not isinstance(body.get("model_path"), str):
            raise BadRequest("update_weights_from_disk needs 'model_path'")
        return self._update(lambda: self.engine.load_from_disk(body["model_path"]), body)

    def _from_tensor(self) -> dict:
        body = self._body()
        if body.get("load_format") != "safetensors_b64":
            raise BadRequest("the CPU engine takes load_format 'safetensors_b64' (base64 "
                             "safetensors bytes), not SGLang's pickled CUDA IPC handles")
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or len(payloads) != 1:
            raise BadRequest("serialized_named_tensors must hold one payload (tp_size is 1)")
        try:
            tensors = load_safetensors(base64.b64decode(payloads[0], validate=True))
        except Exception as err:  # noqa: BLE001 - any decoding failure is the client's
            raise BadRequest(f"cannot decode the safetensors payload: {err}") from None
        return self._update(lambda: self.engine.load_tensors(tensors), body)

    def _init_group(self) -> dict:
        body = self._body()
        if body.get("backend", "nccl") != "gloo":
            raise BadRequest(f"backend {body.get('backend', 'nccl')!r} is not supported on the "
                             "CPU engine: use 'gloo' (or rollout.sync_mode 'tensor' / 'disk')")
        try:
            init_method = f"tcp://{body['master_address']}:{int(body['master_port'])}"
            args = int(body["world_size"]), int(body["rank_offset"])
        except (KeyError, TypeError, ValueError) as err:
            raise BadRequest(f"init_weights_update_group: bad or missing field {err}") from None
        name = body.get("group_name", "weight_update_group")

        def join() -> dict:
            self.groups[name] = init_custom_process_group("gloo", init_method, *args, name)
            return {"success": True, "message": "Succeeded to initialize custom process group."}
        return self.scheduler.submit(join)

    def _from_distributed(self) -> dict:
        body = self._body()
        group = self.groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            raise BadRequest(f"no weight update group {body.get('group_name')!r}: call "
                             "/init_weights_update_group first")
        try:
            specs = [(n, getattr(torch, d), [int(x) for x in s])
                     for n, d, s in zip(body["names"], body["dtypes"], body["shapes"], strict=True)]
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise BadRequest(f"update_weights_from_distributed: bad names/dtypes/shapes {err}")

        def receive() -> None:
            tensors = {}
            for name, dtype, shape in specs:
                tensors[name] = torch.empty(shape, dtype=dtype)
                dist.broadcast(tensors[name], src=0, group=group)
            self.engine.load_tensors(tensors)
        return self._update(receive, body)


def serve(args: argparse.Namespace) -> None:
    """Load the model, then answer HTTP requests until interrupted."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    engine = LocalModel(args.model_path, seed=args.random_seed)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    Handler.engine, Handler.scheduler = engine, Scheduler(engine, args.max_running_requests)
    Handler.server_args = {
        "engine": "mopd-megatron embedded CPU engine", "model_path": args.model_path,
        "host": args.host, "port": server.server_address[1], "tp_size": 1, "dp_size": 1,
        "ep_size": 1, "random_seed": args.random_seed,
        "max_running_requests": args.max_running_requests, "num_threads": torch.get_num_threads(),
        "update_weights_from_tensor_formats": ["safetensors_b64"],
    }
    print(f"embedded engine serving {args.model_path} at http://{args.host}:"
          f"{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


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
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
