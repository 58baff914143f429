"""Rollout stage, embedded CPU engine admission: SGLang request bodies -> batched model work.

Consumes a `/generate` JSON body and produces `SeqRequest`s for `local_engine.LocalModel`
(`parse_generate`: decoded with SGLang's own contract, then refused with `BadRequest` for
what the CPU engine does not do), and runs them (`Scheduler`): one worker thread takes the
queue in order, merging consecutive /generate jobs into one model batch of at most
`max_batch` sequences, and running any other job (a weight update) alone between batches.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from mopd_megatron.rollout.local_engine import LocalModel, SeqRequest
from mopd_megatron.rollout.sglang_contract import load_api_types

SUPPORTED_SAMPLING = {"max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids",
                      "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                      "no_stop_trim", "stream_interval", "sampling_seed"}
SUPPORTED_REQUEST = {"input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                     "top_logprobs_num", "rid", "return_text_in_logprobs"}


class BadRequest(ValueError):
    """A request this engine cannot serve (answered with HTTP 400)."""


def _per_item(value: Any, n: int, default: Any, name: str) -> list:
    """SGLang's `X or list of X` request fields, expanded to one value per sequence."""
    if value is None:
        return [default] * n
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name} has {len(value)} entries for {n} sequences")
        return [default if v is None else v for v in value]
    return [value] * n


def parse_generate(body: Any, vocab_size: int,
                   context_len: int) -> tuple[list[SeqRequest], bool]:
    """Check a /generate body with SGLang's contract; one `SeqRequest` per sequence.

    Args:
        body: The parsed JSON body.
        vocab_size: Token ids must be below it.
        context_len: Prompt + new tokens may not exceed it (SGLang's check, no truncation).

    Returns:
        The sequences, and whether the request was a batch (the reply is then a list).
    """
    api = load_api_types()
    try:
        req = api.GenerateRequest.from_json_value(body)
    except api.JsonContractError as err:
        raise BadRequest(str(err)) from None
    default_req, default_sp = api.GenerateRequest(), api.SamplingParams()
    for field in set(req.__struct_fields__) - SUPPORTED_REQUEST:
        if getattr(req, field) != getattr(default_req, field):
            raise BadRequest(f"'{field}' is not supported by the embedded CPU engine")
    if not req.input_ids:
        raise BadRequest("the embedded CPU engine needs non-empty 'input_ids' (no 'text')")
    batch = isinstance(req.input_ids[0], list)
    seqs = req.input_ids if batch else [req.input_ids]
    n = len(seqs)
    sampling = _per_item(req.sampling_params, n, default_sp, "sampling_params")
    flags = [_per_item(getattr(req, name), n, default, name) for name, default in
             (("return_logprob", False), ("logprob_start_len", -1), ("top_logprobs_num", 0))]
    out = []
    for ids, sp, ret_lp, start, top in zip(seqs, sampling, *flags):
        for field in set(sp.__struct_fields__) - SUPPORTED_SAMPLING:
            if getattr(sp, field) != getattr(default_sp, field):
                raise BadRequest(f"sampling_params.{field} is not supported by the CPU engine")
        if not ids or min(ids) < 0 or max(ids) >= vocab_size:
            raise BadRequest(f"input_ids must be non-empty token ids in [0, {vocab_size})")
        if start > len(ids):
            raise BadRequest(f"logprob_start_len={start} is higher than the number of input "
                             f"tokens {len(ids)}")
        if not 0 <= top <= vocab_size:
            raise BadRequest(f"top_logprobs_num={top} not in [0, {vocab_size}]")
        value = {f: getattr(default_sp if getattr(sp, f) is None else sp, f)
                 for f in ("max_new_tokens", "temperature", "top_p", "top_k")}
        if len(ids) >= context_len or len(ids) + value["max_new_tokens"] > context_len:
            raise BadRequest(f"{len(ids)} input + {value['max_new_tokens']} new tokens exceed the "
                             f"model's context length of {context_len} tokens")
        out.append(SeqRequest(
            list(ids), stop_token_ids=tuple(sp.stop_token_ids or ()), **value,
            ignore_eos=bool(sp.ignore_eos), sampling_seed=sp.sampling_seed,
            return_logprob=bool(ret_lp),
            logprob_start_len=int(start), top_logprobs_num=int(top)))
    return out, batch


class Scheduler:
    """One worker thread: merges queued /generate jobs into a batch; control jobs run alone."""

    def __init__(self, engine: LocalModel, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self._jobs: deque = deque()
        self._cond = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="scheduler").start()

    def submit(self, work: list[SeqRequest] | Callable[[], Any]) -> Any:
        """Queue sequences to generate (or a function to call) and wait for the result."""
        future: Future = Future()
        with self._cond:
            self._jobs.append((work, future))
            self._cond.notify()
        return future.result()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                jobs = [self._jobs.popleft()]
                size = len(jobs[0][0]) if isinstance(jobs[0][0], list) else 0
                while (size and self._jobs and isinstance(self._jobs[0][0], list)
                       and size + len(self._jobs[0][0]) <= self.max_batch):
                    size += len(self._jobs[0][0])
                    jobs.append(self._jobs.popleft())
            try:
                if not size:
                    jobs[0][1].set_result(jobs[0][0]())
                    continue
                results = self.engine.run([seq for work, _ in jobs for seq in work])
                for work, future in jobs:
                    future.set_result(results[:len(work)])
                    results = results[len(work):]
            except Exception as err:  # noqa: BLE001 - every waiting request gets the error
                for _, future in jobs:
                    future.set_exception(err)
