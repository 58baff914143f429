"""Rollout stage, embedded CPU engine admission: a `/generate` body -> one `SeqRequest` per sample.

Consumes the JSON body of a `/generate` request and produces `SeqRequest`s (token ids with
their sampling and log-prob settings resolved), or raises `BadRequest` carrying the HTTP 400
body SGLang 0.5.23 would send. The checks follow SGLang's own code, in its order:

1. the schema: `GenerateRequest.from_json_value` (SGLang's generated contract); a violation
   answers `{"error": "<text>"}`;
2. the request (`io_struct.GenerateReqInput`): a batch is `input_ids` as a list of lists;
   `n > 1` repeats each prompt n times, item-major (prompt 0's samples first); `rid` as one
   string becomes `<rid>_<i>` per batch item;
3. the sampling parameters (`sampling_params.SamplingParams`): `__post_init__` (temperature
   < 1e-6 means greedy: temperature 1, top_k 1; top_k -1 means the whole vocabulary), then
   `normalize` (at most 32 stop strings) and `verify` (value ranges), whose messages name the
   field; these answer `{"error": {"message": "<text>"}}`;
4. the lengths (`tokenizer_manager._validate_one_request`, the scheduler's
   logprob_start_len check).

`return_routed_experts` is read from the body itself: SGLang's `GenerateReqInput` has it,
its JSON contract does not (unknown fields pass the contract).
`token_ids_logprob` and `return_hidden_states` are checked in `local_payloads.py`. What the
CPU engine does not implement (text input, streaming, penalties, min_p, grammars, ...) is
refused with HTTP 400 naming the field, only when it is set.
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from mopd_megatron.rollout.local_payloads import payload_fields
from mopd_megatron.rollout.sglang_contract import load_api_types

TOP_K_ALL = 1 << 30
"""SGLang's top_k for 'the whole vocabulary'."""
MAX_STOP_COUNT = 32
SUPPORTED_REQUEST = {"input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                     "top_logprobs_num", "rid", "return_text_in_logprobs",
                     "routed_experts_start_len", "token_ids_logprob", "return_hidden_states"}
SUPPORTED_SAMPLING = {"max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature",
                      "top_p", "top_k", "n", "ignore_eos", "skip_special_tokens",
                      "spaces_between_special_tokens", "no_stop_trim", "stream_interval",
                      "sampling_seed"}


class BadRequest(ValueError):
    """A request refused with HTTP `status` (400); `body` is the JSON SGLang sends then."""

    def __init__(self, message: str, body: Any = None, status: int = 400):
        super().__init__(message)
        self.body = {"error": {"message": message}} if body is None else body
        self.status = status


@dataclass(eq=False)
class SeqRequest:
    """One sample of a `/generate` request, with SGLang's normalisation applied."""

    input_ids: list[int]
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    max_new_tokens: int = 128
    temperature: float = 1.0
    """> 0; greedy requests arrive as temperature 1 with top_k 1 (as in SGLang)."""
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    stop_token_ids: frozenset[int] = frozenset()
    stop_strs: tuple[str, ...] = ()
    stop_regex: tuple[str, ...] = ()
    stop_tail_tokens: int = 0
    """Output tokens decoded to look for stop strings (SGLang's stop_str_max_len + 1)."""
    ignore_eos: bool = False
    """Disables every token-based stop, stop_token_ids included (SGLang's rule)."""
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    """-1 = no input log-probs; else entries for input_ids[j:], the first one null."""
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    sampling_seed: int | None = None
    token_ids_logprob: tuple[int, ...] = ()
    """Ids whose log-probs every returned position reports (`local_payloads.py`)."""
    return_hidden_states: bool = False
    """Return the final (post-norm) hidden state of every position run."""
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    """Routes are returned for positions [routed_experts_start_len, seqlen - 1)."""
    aborted: str | None = None
    """Set (to the abort message) by the scheduler: the engine finishes the row at its next
    step with finish_reason abort."""

    def prefix_limit(self) -> int:
        """How many leading tokens may come from the prefix cache (SGLang's
        `_compute_max_prefix_len`): all but the last, and none the log-probs must cover."""
        limit = len(self.input_ids) - 1
        return min(limit, self.logprob_start_len) if self.logprob_start_len >= 0 else limit


def _per_item(value: Any, n: int, default: Any, name: str) -> list:
    """SGLang's `X or list of X` request fields, expanded to one value per batch item."""
    if value is None:
        return [default] * n
    if isinstance(value, list):
        if len(value) != n:
            raise BadRequest(f"{name} has {len(value)} entries for {n} sequences")
        return [default if v is None else v for v in value]
    return [value] * n


def _rids(rid: Any, n: int, batch: bool) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(n)]
    if isinstance(rid, str):
        return [f"{rid}_{i}" for i in range(n)] if batch else [rid]
    if len(rid) != n:
        raise BadRequest("The specified rids length mismatch with the batch_size for batch "
                         "processing.")
    return list(rid)


def _value(sp: Any, name: str, default: Any) -> Any:
    value = getattr(sp, name)
    return default if value is None else value


def _verify(sp: Any, vocab_size: int) -> dict[str, Any]:
    """SGLang's `SamplingParams.__post_init__` + `verify`: the resolved values, or BadRequest."""
    temperature, top_p = _value(sp, "temperature", 1.0), _value(sp, "top_p", 1.0)
    top_k, min_p = _value(sp, "top_k", -1), _value(sp, "min_p", 0.0)
    if 0 <= temperature < 1e-6:  # greedy
        temperature, top_k = 1.0, 1
    top_k = TOP_K_ALL if top_k == -1 else top_k
    max_new, min_new = sp.max_new_tokens, _value(sp, "min_new_tokens", 0)
    checks = [
        (math.isfinite(temperature) and temperature >= 0,
         f"temperature must be a non-negative finite number, got {temperature}."),
        (0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}."),
        (0.0 <= min_p <= 1.0, f"min_p must be in [0, 1], got {min_p}."),
        (top_k >= 1, f"top_k must be -1 (disable) or at least 1, got {top_k}."),
        (-2.0 <= _value(sp, "frequency_penalty", 0.0) <= 2.0,
         f"frequency_penalty must be in [-2, 2], got {sp.frequency_penalty}."),
        (-2.0 <= _value(sp, "presence_penalty", 0.0) <= 2.0,
         f"presence_penalty must be in [-2, 2], got {sp.presence_penalty}."),
        (0.0 < _value(sp, "repetition_penalty", 1.0) <= 2.0,
         f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {sp.repetition_penalty}."),
        (min_new >= 0, f"min_new_tokens must be in [0, max_new_tokens], got {min_new}."),
        (max_new is None or max_new >= 0, f"max_new_tokens must be at least 0, got {max_new}."),
        (max_new is None or min_new <= max(max_new, 0),
         f"min_new_tokens must be in [0, max_new_tokens({max_new})], got {min_new}."),
        (all(k.lstrip("-").isdigit() and 0 <= int(k) < vocab_size for k in sp.logit_bias),
         f"logit_bias must has keys in [0, {vocab_size - 1}], got {list(sp.logit_bias)}."),
        (sp.sampling_seed is None or -(2**63) <= sp.sampling_seed <= 2**63 - 1,
         f"sampling_seed must be in [-2**63, 2**63 - 1], got {sp.sampling_seed}."),
    ]
    for ok, message in checks:
        if not ok:
            raise BadRequest(message)
    return {"temperature": float(temperature), "top_p": float(top_p), "top_k": int(top_k)}


def _stops(sp: Any, tokenizer: Any) -> dict[str, Any]:
    """Stop strings and regexes (SGLang's `normalize`); matching them needs the tokenizer."""
    strs = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or [])
    regex = [sp.stop_regex] if isinstance(sp.stop_regex, str) else list(sp.stop_regex or [])
    if len(strs) > MAX_STOP_COUNT:
        raise BadRequest(f"at most {MAX_STOP_COUNT} stop strings are allowed, got {len(strs)}")
    if (strs or regex) and tokenizer is None:
        raise BadRequest("sampling_params.stop / stop_regex need the model's tokenizer, and "
                         "this checkpoint has none")
    for pattern in regex:
        try:
            re.compile(pattern)
        except re.error as err:
            raise BadRequest(f"invalid stop_regex {pattern!r}: {err}") from None
    lengths = [len(tokenizer.encode(s, add_special_tokens=False)) for s in strs]
    longest = max(lengths + [len(p) for p in regex] + [0])
    return {"stop_strs": tuple(s for s in strs if s), "stop_regex": tuple(regex),
            "stop_tail_tokens": longest + 1 if strs or regex else 0}


def _check_supported(obj: Any, default: Any, supported: set[str], prefix: str) -> None:
    for name in sorted(set(obj.__struct_fields__) - supported):
        if getattr(obj, name) != getattr(default, name):
            raise BadRequest(f"'{prefix}{name}' is not supported by the embedded CPU engine")


def parse_generate(body: Any, vocab_size: int, context_len: int, tokenizer: Any = None,
                   hidden_states_enabled: bool = False) -> tuple[list[SeqRequest], bool]:
    """Check a /generate body as SGLang does; one `SeqRequest` per sample.

    Args:
        body: The parsed JSON body.
        vocab_size: Token ids must be below it.
        context_len: Prompt + new tokens may not exceed it (no truncation, as SGLang's default).
        tokenizer: The model's tokenizer (stop strings, token texts), or None.
        hidden_states_enabled: The server runs with `--enable-return-hidden-states`.

    Returns:
        The samples (item-major for n > 1), and whether the reply is a list (a batch, or n > 1).
    """
    api = load_api_types()
    try:
        req = api.GenerateRequest.from_json_value(body)
    except api.JsonContractError as err:
        raise BadRequest(str(err), {"error": str(err)}) from None
    _check_supported(req, api.GenerateRequest(), SUPPORTED_REQUEST, "")
    if not req.input_ids:
        raise BadRequest("the embedded CPU engine needs non-empty 'input_ids' (no 'text')")
    if req.return_text_in_logprobs and tokenizer is None:
        raise BadRequest("return_text_in_logprobs needs the model's tokenizer")
    batch = isinstance(req.input_ids[0], list)
    prompts = req.input_ids if batch else [req.input_ids]
    sampling = _per_item(req.sampling_params, len(prompts), api.SamplingParams(), "sampling_params")
    n = _value(sampling[0], "n", 1)
    if any(_value(sp, "n", 1) != n for sp in sampling):
        raise BadRequest("The parallel_sample_num should be the same for all samples in sample "
                         "params.")
    if n < 1:
        raise BadRequest(f"n must be at least 1, got {n}.")
    names = ("return_logprob", "logprob_start_len", "top_logprobs_num")
    for name in names:
        if n > 1 and isinstance(getattr(req, name), list):
            raise BadRequest(f"Cannot use list {name} with parallel_sample_num > 1")
    flags = [_per_item(getattr(req, name), len(prompts), d, name)
             for name, d in zip(names, (False, -1, 0))]
    routes = _routes_request(body, req.routed_experts_start_len, prompts)
    try:
        payloads = payload_fields(req, len(prompts), n, vocab_size, hidden_states_enabled)
    except ValueError as err:
        raise BadRequest(str(err)) from None
    out = []
    for ids, sp, rid, payload, ret_lp, start, top in zip(
            prompts, sampling, _rids(req.rid, len(prompts), batch), payloads, *flags):
        settings = _verify(sp, vocab_size) | _stops(sp, tokenizer)
        _check_supported(sp, api.SamplingParams(), SUPPORTED_SAMPLING, "sampling_params.")
        out += [_sample(list(ids), rid if n == 1 else uuid.uuid4().hex, sp, settings,
                        bool(ret_lp), int(start), int(top), vocab_size, context_len,
                        bool(req.return_text_in_logprobs), routes | payload) for _ in range(n)]
    return out, batch or n > 1


def _routes_request(body: Any, start: int, prompts: list) -> dict[str, Any]:
    """`return_routed_experts` (a field of SGLang's `GenerateReqInput` that its JSON contract
    does not list) and the scheduler's check of `routed_experts_start_len`."""
    wanted = body.get("return_routed_experts", False)
    if not isinstance(wanted, bool):
        raise BadRequest(f"return_routed_experts must be a boolean, got {wanted!r:.50}")
    if not wanted:
        return {}
    if start < 0:
        raise BadRequest(f"recv_req.routed_experts_start_len={start} is lower than 0. Please "
                         "use a non-negative routed_experts_start_len.")
    for ids in prompts:
        if start > len(ids):
            raise BadRequest(f"recv_req.routed_experts_start_len={start} is higher than the "
                             f"number of input tokens len(req.origin_input_ids)={len(ids)}. "
                             "Please use a smaller routed_experts_start_len.")
    return {"return_routed_experts": True, "routed_experts_start_len": start}


def _sample(ids: list[int], rid: str, sp: Any, settings: dict, return_logprob: bool, start: int,
            top: int, vocab_size: int, context_len: int, texts: bool,
            routes: dict[str, Any]) -> SeqRequest:
    if not ids or min(ids) < 0 or max(ids) >= vocab_size:
        raise BadRequest(f"input_ids must be non-empty token ids in [0, {vocab_size})")
    if len(ids) >= context_len:
        raise BadRequest(f"The input ({len(ids)} tokens) is longer than the model's context "
                         f"length ({context_len} tokens).")
    max_new = context_len - len(ids) if sp.max_new_tokens is None else sp.max_new_tokens
    if len(ids) + max_new > context_len:
        raise BadRequest(
            "Requested token count exceeds the model's maximum context length of "
            f"{context_len} tokens. You requested a total of {len(ids) + max_new} tokens: "
            f"{len(ids)} tokens from the input messages and {max_new} tokens for the "
            "completion. Please reduce the number of tokens in the input messages or the "
            "completion to fit within the limit.")
    if return_logprob and start > len(ids):
        raise BadRequest(f"logprob_start_len={start} is higher than the number of input tokens "
                         f"{len(ids)}. Please use a smaller logprob_start_len.")
    if not 0 <= top <= vocab_size:
        raise BadRequest(f"top_logprobs_num={top} not in [0, {vocab_size}]")
    if not return_logprob:
        start, top = -1, 0
    elif start < 0:
        start = len(ids)  # output log-probs only: no input entries
    return SeqRequest(
        ids, rid, max_new_tokens=int(max_new), **settings,
        stop_token_ids=frozenset(int(t) for t in sp.stop_token_ids or ()),
        ignore_eos=bool(sp.ignore_eos), skip_special_tokens=_value(sp, "skip_special_tokens", True),
        no_stop_trim=bool(sp.no_stop_trim), return_logprob=return_logprob,
        logprob_start_len=start, top_logprobs_num=top, return_text_in_logprobs=texts,
        sampling_seed=sp.sampling_seed, **routes)
