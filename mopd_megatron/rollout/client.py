"""Rollout/teacher stage, engine API: the one client of SGLang and the embedded engine.

Consumes token ids and produces typed results (`types.py`): `generate(prompts, sampling)`
-> `Generation`s (the student's rollout, with behaviour log-probs mu_theta),
`score(sequences, response_starts, top_k)` -> `Scores` (teacher prefill scoring, the
post-sync probe), plus the control endpoints: health, model/server info, cache flush and
the three weight-update paths (disk, tensor, distributed). The rollout engine, every
teacher and the weight sync talk through this class.

It follows SGLang 0.5.23: tensor and distributed updates run inside a weight-update session
(`weight_update_session()`: /begin_weight_update ... /end_weight_update), a failed update
is SGLang's HTTP 400 `{"success": false, "message": ...}` (raised as `EngineError`), and the
info routes are /model_info and /server_info. Against an older server that answers 404 to
these routes, it uses /get_model_info and /get_server_info and updates without a session.

Each call is async (`agenerate`, `ascore`, ...) with a blocking twin of the same name
without the `a`. Sequences go `batch_size` per request in SGLang's batch form (`input_ids`
as a list of lists), requests run concurrently up to `max_concurrency`, and results come
back in input order. Deadlines, retries and errors (`EngineError`) are `transport.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any

import torch

from mopd_megatron.rollout.hidden_payload import attach_hidden
from mopd_megatron.rollout.tensor_payload import tensor_payload
from mopd_megatron.rollout.transport import EngineError, HttpEndpoint, run_sync
from mopd_megatron.rollout.types import (
    Generation,
    RouteShape,
    SamplingParams,
    Scores,
    parse_generations,
    parse_scores,
)

__all__ = ["EngineClient", "EngineError", "Generation", "SamplingParams", "Scores"]

class EngineClient(HttpEndpoint):
    """Client of one SGLang-compatible server (a real SGLang, or the embedded engine).

    Args: as `HttpEndpoint` (url, timeout_s, max_retries, max_concurrency, batch_size,
    backoff_s); `EngineClient.from_config(url, engine_config)` takes them from a recipe.
    """

    async def _batched(self, n: int, call: Callable[[slice], Coroutine]) -> list:
        """Run `call` on consecutive slices of `batch_size` items; concatenate in order."""
        slices = [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        parts = await asyncio.gather(*(call(s) for s in slices))
        return [item for part in parts for item in part]

    # -- generation and scoring ----------------------------------------------------------

    async def agenerate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                        routes: RouteShape | None = None, top_k: int = 0) -> list[Generation]:
        """Sample one response per prompt, with per-token log-probs (in input order).

        Args:
            prompts: Token ids of each prompt (repeat a prompt for several samples).
            sampling: Temperature, top-p/k, max_new_tokens, stop tokens.
            routes: Also return every token's routed experts, which must have this shape
                (routing replay; the server needs --enable-return-routed-experts).
            top_k: Also return the engine's top-k ids at each sampled position (0 = off).

        Returns:
            One `Generation` per prompt.
        """
        async def call(part: slice) -> list[Generation]:
            batch = [list(map(int, p)) for p in prompts[part]]
            payload = {"input_ids": batch, "sampling_params": sampling.to_sglang(part),
                       "return_logprob": True}
            if routes is not None:
                payload["return_routed_experts"] = True
            if top_k > 0:
                payload["top_logprobs_num"] = int(top_k)
            return await self._request(
                "POST", "/generate", payload,
                parse=lambda r: parse_generations(r, batch, sampling, routes, top_k))
        return await self._batched(len(prompts), call)

    async def ascore(self, sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
                     top_k: int = 0, hidden_dtype: torch.dtype | None = None,
                     token_ids: Sequence[Sequence[int]] | None = None) -> list[Scores]:
        """Prefill-only log-probs of given tokens at temperature 1 (no sampling).

        Args:
            sequences: Token ids of each prompt + response.
            response_starts: First scored position of each sequence (>= 1: the first token
                of a sequence has no log-prob). Scores cover positions start..len-1.
            top_k: Also return the top-k ids and log-probs at those positions (0 = off).
            hidden_dtype: Also return the final hidden states that predict them, kept in
                this dtype (None = off; the server needs --enable-return-hidden-states).
            token_ids: Also return, per sequence, the log-probs of these ids at every scored
                position (SGLang's `token_ids_logprob`, one list per sequence; None = off).

        Returns:
            One `Scores` per sequence, in input order.
        """
        if len(sequences) != len(response_starts):
            raise ValueError(f"{len(sequences)} sequences but {len(response_starts)} starts")
        if token_ids is not None and len(token_ids) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(token_ids)} token_ids lists")
        for seq, r in zip(sequences, response_starts):
            if not 1 <= r <= len(seq):
                raise ValueError(f"response start {r} not in [1, {len(seq)}]")

        async def call(part: slice) -> list[Scores]:
            batch = [list(map(int, s)) for s in sequences[part]]
            starts = [int(r) for r in response_starts[part]]
            payload = {"input_ids": batch, "return_logprob": True,
                       "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                       "logprob_start_len": [r - 1 for r in starts]}
            if top_k > 0:
                payload["top_logprobs_num"] = int(top_k)
            if hidden_dtype is not None:
                payload["return_hidden_states"] = True
            chosen = None if token_ids is None else [list(map(int, i)) for i in token_ids[part]]
            if chosen is not None:
                payload["token_ids_logprob"] = chosen

            def parse(resp: Any) -> list[Scores]:
                scores = parse_scores(resp, batch, starts, top_k, chosen)
                if hidden_dtype is None:
                    return scores
                return attach_hidden(scores, resp, batch, starts, hidden_dtype)
            return await self._request("POST", "/generate", payload, parse=parse)
        return await self._batched(len(sequences), call)

    # -- control --------------------------------------------------------------------------

    async def ahealth(self) -> bool:
        """True when GET /health answers 200 (one attempt, no exception)."""
        try:
            await self._request("GET", "/health", json_reply=False, retries=0)
            return True
        except EngineError:
            return False

    async def _get_renamed(self, path: str, old_path: str) -> Any:
        """GET `path`, or `old_path` on a server that does not have it yet (HTTP 404)."""
        try:
            return await self._request("GET", path)
        except EngineError as err:
            if err.status != 404:
                raise
        return await self._request("GET", old_path)

    async def amodel_info(self) -> dict:
        """GET /model_info (has `model_path`, `weight_version`)."""
        return await self._get_renamed("/model_info", "/get_model_info")

    async def aserver_info(self) -> dict:
        """GET /server_info (launch settings, e.g. `tp_size`)."""
        return await self._get_renamed("/server_info", "/get_server_info")

    async def aflush_cache(self) -> None:
        """POST /flush_cache (drop the prefix cache)."""
        await self._request("POST", "/flush_cache", json_reply=False)

    async def _update(self, path: str, payload: dict, retries: int | None = None) -> dict:
        """POST a weight-update call; SGLang answers {"success", "message"} (400 on failure)."""
        reply = await self._request("POST", path, payload, retries=retries)
        if not isinstance(reply, dict) or reply.get("success") is not True:
            raise EngineError(self.url, f"{path} failed: {reply!r:.1000}")
        return reply

    async def abegin_weight_update(self) -> bool:
        """Open SGLang's weight-update session (POST /begin_weight_update).

        Returns:
            False when the server has no such route (SGLang before 0.5.23: no session needed).
        """
        try:
            await self._update("/begin_weight_update", {}, retries=0)
        except EngineError as err:
            if err.status == 404:
                return False
            raise
        return True

    async def aend_weight_update(self) -> dict:
        """Close the weight-update session (POST /end_weight_update)."""
        return await self._update("/end_weight_update", {}, retries=0)

    @contextlib.contextmanager
    def weight_update_session(self) -> Iterator[None]:
        """Blocking: tensor/distributed updates inside begin/end_weight_update (closed also
        when an update fails, so the server is never left with a session open)."""
        opened = self.begin_weight_update()
        try:
            yield
        except BaseException:
            if opened:
                with contextlib.suppress(EngineError):
                    self.end_weight_update()
            raise
        if opened:
            self.end_weight_update()

    async def aupdate_weights_from_disk(self, model_path: str, *, flush_cache: bool = True,
                                       weight_version: str | None = None) -> dict:
        """Reload all weights from an HF checkpoint folder the server can read."""
        payload = {"model_path": str(model_path), "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        return await self._update("/update_weights_from_disk", payload)

    async def aupdate_weights_from_tensor(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, flush_cache: bool = True,
        weight_version: str | None = None,
    ) -> dict:
        """Load some weights (HF names) sent in the request body (inside a session).

        The format follows the server (`tensor_payload.py`): base64 safetensors for the
        embedded engine; SGLang's pickle of CUDA IPC handles for a real SGLang on this node.
        """
        payload = tensor_payload(list(named_tensors), await self.aserver_info())
        payload["flush_cache"] = flush_cache
        if weight_version is not None:
            payload["weight_version"] = weight_version
        return await self._update("/update_weights_from_tensor", payload)

    async def ainit_weights_update_group(self, master_address: str, master_port: int,
                                         rank_offset: int, world_size: int, *,
                                         group_name: str = "weight_update_group",
                                         backend: str = "nccl") -> dict:
        """Ask the server to join a process group with the trainer (rank 0 = the trainer)."""
        payload = {"master_address": master_address, "master_port": int(master_port),
                   "rank_offset": int(rank_offset), "world_size": int(world_size),
                   "group_name": group_name, "backend": backend}
        return await self._update("/init_weights_update_group", payload, retries=0)

    async def adestroy_weights_update_group(self,
                                            group_name: str = "weight_update_group") -> dict:
        """Ask the server to leave the weight-update group."""
        return await self._update("/destroy_weights_update_group", {"group_name": group_name},
                                  retries=0)

    async def aupdate_weights_from_distributed(
        self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]], *,
        group_name: str = "weight_update_group", flush_cache: bool = True,
        weight_version: str | None = None,
    ) -> dict:
        """Announce tensors that the trainer then broadcasts from rank 0 of the group (inside
        a session)."""
        payload = {"names": list(names), "dtypes": list(dtypes),
                   "shapes": [list(map(int, s)) for s in shapes], "group_name": group_name,
                   "flush_cache": flush_cache}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        return await self._update("/update_weights_from_distributed", payload, retries=0)

    # -- blocking twins -------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                 routes: RouteShape | None = None, top_k: int = 0) -> list[Generation]:
        """Blocking `agenerate`."""
        return run_sync(self.agenerate(prompts, sampling, routes, top_k))

    def score(self, sequences: Sequence[Sequence[int]], response_starts: Sequence[int],
              top_k: int = 0, hidden_dtype: torch.dtype | None = None,
              token_ids: Sequence[Sequence[int]] | None = None) -> list[Scores]:
        """Blocking `ascore`."""
        return run_sync(self.ascore(sequences, response_starts, top_k, hidden_dtype, token_ids))

    def health(self) -> bool:
        """Blocking `ahealth`."""
        return run_sync(self.ahealth())

    def model_info(self) -> dict:
        """Blocking `amodel_info`."""
        return run_sync(self.amodel_info())

    def server_info(self) -> dict:
        """Blocking `aserver_info`."""
        return run_sync(self.aserver_info())

    def flush_cache(self) -> None:
        """Blocking `aflush_cache`."""
        return run_sync(self.aflush_cache())

    def update_weights_from_disk(self, model_path: str, **kw: Any) -> dict:
        """Blocking `aupdate_weights_from_disk`."""
        return run_sync(self.aupdate_weights_from_disk(model_path, **kw))

    def update_weights_from_tensor(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                   **kw: Any) -> dict:
        """Blocking `aupdate_weights_from_tensor`."""
        return run_sync(self.aupdate_weights_from_tensor(named_tensors, **kw))

    def begin_weight_update(self) -> bool:
        """Blocking `abegin_weight_update`."""
        return run_sync(self.abegin_weight_update())

    def end_weight_update(self) -> dict:
        """Blocking `aend_weight_update`."""
        return run_sync(self.aend_weight_update())

    def init_weights_update_group(self, *args: Any, **kw: Any) -> dict:
        """Blocking `ainit_weights_update_group`."""
        return run_sync(self.ainit_weights_update_group(*args, **kw))

    def destroy_weights_update_group(self, *args: Any, **kw: Any) -> dict:
        """Blocking `adestroy_weights_update_group`."""
        return run_sync(self.adestroy_weights_update_group(*args, **kw))

    def update_weights_from_distributed(self, *args: Any, **kw: Any) -> dict:
        """Blocking `aupdate_weights_from_distributed`."""
        return run_sync(self.aupdate_weights_from_distributed(*args, **kw))

