"""Rollout stage, embedded CPU engine: SGLang 0.5.23's weight-update endpoints and protocol.

Consumes the JSON bodies of the weight-update routes; produces SGLang's replies: 200 with
`{"success": true, "message": ...}` or 400 with `{"success": false, "message": ...}` (from
disk also `num_paused_requests`), with SGLang's messages. The protocol follows SGLang's
scheduler (`scheduler_components/weight_updater.py`) and tokenizer manager:

- /update_weights_from_tensor and /update_weights_from_distributed run only inside a session
  opened by /begin_weight_update and closed by /end_weight_update (one session at a time);
  /update_weights_from_disk needs none;
- `weight_version` is recorded on success (meta_info and /model_info report it);
- `flush_cache` (default true) flushes the prefix cache afterwards, which fails the call while
  generation is paused in place (SGLang: the cache cannot be flushed while requests run);
- `abort_all_requests` aborts every request first;
- /init_weights_update_group joins a process group with the trainer (rank 0),
  /update_weights_from_distributed receives the announced tensors by broadcast from it,
  /destroy_weights_update_group leaves it.

Every update runs on the scheduler's worker thread (between batches, or while paused in
place). Where the CPU engine differs: tensors travel as one base64 safetensors payload
(`load_format: "safetensors_b64"`), not SGLang's pickled CUDA IPC handles, and the group
backend is gloo, not NCCL.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as load_safetensors

from mopd_megatron.rollout.local_engine import LocalModel
from mopd_megatron.rollout.local_requests import BadRequest
from mopd_megatron.rollout.local_scheduler import Scheduler
from mopd_megatron.rollout.process_group import init_custom_process_group
from mopd_megatron.rollout.tensor_payload import SAFETENSORS_B64

NOT_FLUSHED = ("Weights were updated, but the cache was not flushed because requests are still "
               "running or queued. Retract or finish them, then call /flush_cache.")


def get_field(body: Any, name: str, kind: type | tuple, default: Any = ...) -> Any:
    """A body field of the expected JSON type (SGLang's request validation: HTTP 400)."""
    if not isinstance(body, dict):
        raise invalid(f"the body must be a JSON object, got {type(body).__name__}")
    if name not in body and default is not ...:
        return default
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind in (int, float):
        raise invalid(f"'{name}': expected {getattr(kind, '__name__', kind)}, got {value!r:.80}")
    return value


def invalid(message: str) -> BadRequest:
    """SGLang's reply to a body that fails its request model (FastAPI validation)."""
    return BadRequest(message, {"object": "error", "message": message, "type": "Bad Request",
                                "param": None, "code": 400})


class WeightUpdates:
    """The weight-update routes of one engine.

    Args:
        model: The served model.
        scheduler: Runs each update between batches.
        flush: Flushes the prefix cache; False when requests are running.
    """

    def __init__(self, model: LocalModel, scheduler: Scheduler, flush: Callable[[], bool]):
        self.model, self.scheduler, self.flush = model, scheduler, flush
        self.session_open = False
        self.groups: dict[str, dist.ProcessGroup] = {}

    def begin(self, body: Any) -> tuple[int, dict]:
        def run() -> tuple[int, dict]:
            if self.session_open:
                return _reply(False, "a weight-update session is already open; call "
                                     "end_weight_update() first")
            self.session_open = True
            return _reply(True, "Success")
        return self.scheduler.control(run)

    def end(self, body: Any) -> tuple[int, dict]:
        def run() -> tuple[int, dict]:
            if not self.session_open:
                return _reply(False, "no weight-update session is open; call "
                                     "begin_weight_update() first")
            self.session_open = False
            return _reply(True, "Success")
        return self.scheduler.control(run)

    def from_disk(self, body: Any) -> tuple[int, dict]:
        path = get_field(body, "model_path", str)

        def load() -> str:
            try:
                self.model.load_from_disk(path)
            except (OSError, ValueError) as err:
                raise _Failed(f"Failed to update weights: {err}.\nRolling back to original "
                              "weights.") from None
            return "Succeeded to update model weights."
        status, reply = self._update(body, load, "disk")
        return status, dict(reply, num_paused_requests=0)

    def from_tensor(self, body: Any) -> tuple[int, dict]:
        payloads = get_field(body, "serialized_named_tensors", list)
        load_format = get_field(body, "load_format", (str, type(None)), None)

        def load() -> str:
            if load_format != SAFETENSORS_B64:
                raise _Failed(f"the CPU engine takes load_format '{SAFETENSORS_B64}' (base64 "
                              "safetensors bytes), not SGLang's pickled CUDA IPC handles")
            if len(payloads) != 1:
                raise _Failed("serialized_named_tensors must hold one payload (tp_size is 1)")
            try:
                tensors = load_safetensors(base64.b64decode(payloads[0], validate=True))
            except Exception as err:  # noqa: BLE001 - any decoding failure is the client's
                raise _Failed(f"cannot decode the safetensors payload: {err}") from None
            self._load(tensors)
            return "Success"
        return self._update(body, load, "tensor")

    def from_distributed(self, body: Any) -> tuple[int, dict]:
        names, dtypes = get_field(body, "names", list), get_field(body, "dtypes", list)
        shapes = get_field(body, "shapes", list)
        name = get_field(body, "group_name", str, "weight_update_group")
        try:
            specs = [(n, getattr(torch, d), [int(x) for x in s])
                     for n, d, s in zip(names, dtypes, shapes, strict=True)]
        except (TypeError, ValueError, AttributeError) as err:
            raise invalid(f"names/dtypes/shapes: {err}") from None

        def receive() -> str:
            group = self.groups.get(name)
            if group is None:
                raise _Failed(f"Failed to receive weights: Group {name} not in "
                              f"{list(self.groups)}. Please call `init_weights_update_group` "
                              "first.")
            tensors = {}
            for tensor_name, dtype, shape in specs:
                tensors[tensor_name] = torch.empty(shape, dtype=dtype)
                dist.broadcast(tensors[tensor_name], src=0, group=group)
            self._load(tensors)
            return "Succeeded to update parameter online."
        return self._update(body, receive, "distributed")

    def init_group(self, body: Any) -> tuple[int, dict]:
        address, port = get_field(body, "master_address", str), get_field(body, "master_port", int)
        rank, world = get_field(body, "rank_offset", int), get_field(body, "world_size", int)
        name = get_field(body, "group_name", str, "weight_update_group")
        backend = get_field(body, "backend", str, "nccl")

        def join() -> tuple[int, dict]:
            if backend != "gloo":
                return _reply(False, f"Failed to initialize custom process group: backend "
                                     f"{backend!r} is not supported on the CPU engine: use "
                                     "'gloo' (or rollout.sync_mode 'tensor' / 'disk').")
            try:
                self.groups[name] = init_custom_process_group(
                    "gloo", f"tcp://{address}:{port}", world, rank, name)
            except Exception as err:  # noqa: BLE001 - SGLang reports any failure
                return _reply(False, f"Failed to initialize custom process group: {err}.")
            return _reply(True, "Succeeded to initialize custom process group.")
        return self.scheduler.control(join)

    def destroy_group(self, body: Any) -> tuple[int, dict]:
        name = get_field(body, "group_name", str, "weight_update_group")

        def leave() -> tuple[int, dict]:
            if name not in self.groups:
                return _reply(False, "The group to be destroyed does not exist.")
            dist.destroy_process_group(self.groups.pop(name))
            return _reply(True, "Succeeded to destroy custom process group.")
        return self.scheduler.control(leave)

    # -- shared ---------------------------------------------------------------------------

    def _load(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            self.model.load_tensors(tensors)
        except ValueError as err:
            raise _Failed(f"Failed to update weights: {err}") from None

    def _update(self, body: Any, load: Callable[[], str], source: str) -> tuple[int, dict]:
        """Run `load` on the worker thread with SGLang's session, version and flush rules."""
        version = get_field(body, "weight_version", (str, type(None)), None)
        flush = get_field(body, "flush_cache", bool, True)
        if get_field(body, "abort_all_requests", bool, False):
            self.scheduler.abort(abort_all=True)

        def run() -> tuple[int, dict]:
            if source != "disk" and not self.session_open:
                return _reply(False, f"update_weights_from_{source} must run between "
                                     "begin_weight_update() and end_weight_update()")
            try:
                message = load()
            except _Failed as err:
                return _reply(False, str(err))
            if version is not None:
                self.model.weight_version = version
            if flush and not self.flush():
                return _reply(False, NOT_FLUSHED)
            suffix = f" Weight version updated to {version}." if version is not None else ""
            return _reply(True, message + suffix)
        return self.scheduler.control(run)


class _Failed(Exception):
    """An update that failed; its message is SGLang's."""


def _reply(success: bool, message: str) -> tuple[int, dict]:
    return (200 if success else 400), {"success": success, "message": message}
