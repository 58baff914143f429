"""Rollout/teacher stage, wire format: typed results <-> SGLang `/generate` JSON, with validation.

Consumes the JSON that an SGLang-compatible `/generate` returns for a batch request and
produces typed, checked results:

- `Generation` (rollout): `prompt_ids`, sampled `output_ids`, and `output_logprobs`, the
  engine's log-prob of each sampled token (the behaviour log-prob mu_theta; SGLang reports
  the temperature-scaled distribution, before top-p/top-k truncation); with `top_k > 0`
  also `top_ids`, the engine's k most likely ids at each sampled position
  (`top_logprobs_num`, meta_info `output_top_logprobs`, of that same distribution).
- `Scores` (teachers, sync probe): for a prompt+response sequence s and a response start r,
  `token_logprobs[t - r] = log p(s[t] | s[:t])` for t in r..len(s)-1, and optionally the top-k
  ids/log-probs at those positions ([len(s) - r][k]), and optionally the log-probs of given
  ids at those positions (`token_ids_logprob`, meta_info `input_token_ids_logprobs`: per
  position the requested ids in the requested order, [len(s) - r][len(ids)]).

SGLang's prefill scoring semantics (scheduler `logprob_result_processor`): with
`logprob_start_len = j`, `meta_info.input_token_logprobs` has len(s) - j entries
`[logprob, token_id, text]` for tokens s[j:], and the first entry's log-prob is always null
(SGLang prepends None and drops the last position's prediction). So scoring from position r
asks for `logprob_start_len = r - 1` and drops the first entry; r >= 1 because the first
token of a sequence has no log-prob.

Every check failure raises `ResponseError` (the client retries it, then names the endpoint):
a wrong number of items, lengths that disagree, token ids that are not the ones sent, a
value of the wrong type (null, a string, a bool for a number), or a missing / non-finite
log-prob. Nothing is shortened or zero-filled.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class ResponseError(ValueError):
    """A response that does not have the structure, lengths or values the request implies."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, named as SGLang's `sampling_params` fields."""

    temperature: float = 1.0
    """0 = greedy (log-probs are then of the unscaled distribution, as in SGLang)."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 (or 0) = off."""
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens; the model's EOS always stops (SGLang's default, ignore_eos=false)."""
    sampling_seed: int | None = None
    """Makes sampling reproducible: item i of a request list samples with seed + i (SGLang's
    per-request `sampling_seed`), so a resumed run draws exactly what the original drew."""

    @classmethod
    def from_config(cls, cfg: Any) -> SamplingParams:
        """The sampling settings of a `RolloutConfig` (temperature, top-p/k, max_new_tokens)."""
        return cls(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                   max_new_tokens=cfg.max_new_tokens)

    def to_sglang(self, items: slice | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """The `sampling_params` JSON (only fields SGLang's contract accepts).

        With a seed and `items` (the request's slice of the prompt list), one object per item.
        """
        if self.sampling_seed is not None and items is not None:
            base = dataclasses.replace(self, sampling_seed=None).to_sglang()
            return [dict(base, sampling_seed=self.sampling_seed + i)
                    for i in range(items.start, items.stop)]
        params: dict[str, Any] = {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "max_new_tokens": int(self.max_new_tokens),
        }
        if self.top_k > 0:
            params["top_k"] = int(self.top_k)
        if self.stop_token_ids:
            params["stop_token_ids"] = [int(t) for t in self.stop_token_ids]
        if self.sampling_seed is not None:
            params["sampling_seed"] = int(self.sampling_seed)
        return params


@dataclass
class Generation:
    """One sampled response."""

    prompt_ids: list[int]
    output_ids: list[int]
    output_logprobs: list[float]
    """[len(output_ids)] engine log-probs mu_theta of the sampled tokens."""
    finish_reason: str
    """'stop' (EOS or a stop token, which is included in output_ids), 'length' or 'abort'."""
    routed_experts: torch.Tensor | None = None
    """[len(prompt) + len(output) - 1, layers, top_k] int32: the experts the engine routed
    each token to (none for the last token), when asked for (`RouteShape`)."""
    top_ids: list[list[int]] | None = None
    """[len(output_ids)][k] the engine's top-k ids at each sampled position (best first), when
    asked for (`agenerate(top_k=k)`; the `student_topk` teacher payload)."""


@dataclass(frozen=True)
class RouteShape:
    """What the rollout engine's routes must look like: the model's decoder layers, top-k and
    expert count (SGLang returns [tokens, num_hidden_layers, num_experts_per_tok] int32)."""

    num_layers: int
    top_k: int
    num_experts: int


@dataclass
class Scores:
    """Log-probs of given tokens of one sequence, from position `response_start` on."""

    token_logprobs: list[float]
    """[len - response_start]: log p(seq[t] | seq[:t])."""
    top_ids: list[list[int]] | None = field(default=None)
    """[len - response_start][k] top-k token ids per position, or None when k = 0."""
    top_logprobs: list[list[float]] | None = field(default=None)
    """[len - response_start][k] their log-probs (descending), or None when k = 0."""
    token_ids_logprobs: list[list[float]] | None = None
    """[len - response_start][len(ids)] log-probs of the requested ids at each position, in the
    requested order, when asked for (`ascore(token_ids=...)`)."""
    hidden_states: torch.Tensor | None = None
    """[len - response_start, H] the teacher's final hidden state at the position before each
    scored token (its logits = hidden @ lm_head.T), when asked for (`hidden_payload.py`)."""


def _is_token(value: Any) -> bool:
    return type(value) is int and value >= 0


def _logprob(entry: Any, token_id: int | None, where: str) -> float:
    """Check one `[logprob, token_id, text]` triple and return its finite log-prob."""
    if not isinstance(entry, (list, tuple)) or len(entry) < 2:
        raise ResponseError(f"{where}: expected [logprob, token_id, text], got {entry!r:.200}")
    value, tid = entry[0], entry[1]
    if not _is_token(tid):
        raise ResponseError(f"{where}: token id {tid!r:.50} is not a token id")
    if token_id is not None and tid != token_id:
        raise ResponseError(f"{where}: log-prob is for token {tid!r}, expected {token_id}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ResponseError(f"{where}: missing log-prob ({value!r})")
    if not math.isfinite(value):
        raise ResponseError(f"{where}: non-finite log-prob {value}")
    return float(value)


def _items(resp: Any, n: int) -> list[dict]:
    if not isinstance(resp, list) or len(resp) != n:
        got = f"a list of {len(resp)}" if isinstance(resp, list) else type(resp).__name__
        raise ResponseError(f"expected a list of {n} results for a batch of {n}, got {got}")
    for i, item in enumerate(resp):
        if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
            raise ResponseError(f"result {i}: expected an object with meta_info, got {item!r:.200}")
    return resp


def _top_rows(rows: Any, n: int, k: int, where: str,
              expected: Sequence[int] | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """n rows of k `[logprob, token_id, text]` entries -> (ids, log-probs); with `expected`,
    every row must hold exactly those ids in that order (`token_ids_logprob`)."""
    if not isinstance(rows, list) or len(rows) != n:
        raise ResponseError(f"{where}: expected {n} rows, got {rows!r:.200}")
    ids, lps = [], []
    for t, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != k:
            raise ResponseError(f"{where}[{t}]: expected {k} entries, got {row!r:.200}")
        lps.append([_logprob(e, None if expected is None else expected[j], f"{where}[{t}]")
                    for j, e in enumerate(row)])
        ids.append([e[1] for e in row])
    return ids, lps


def parse_routes(meta: dict, tokens: int, shape: RouteShape, where: str) -> torch.Tensor:
    """`meta_info["routed_experts"]` (base64 int32) -> [tokens, layers, top_k], checked."""
    encoded = meta.get("routed_experts")
    if not isinstance(encoded, str):
        raise ResponseError(f"{where}: routed_experts missing ({encoded!r:.50}); was the "
                            "engine started with --enable-return-routed-experts?")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ResponseError(f"{where}: routed_experts is not base64: {err}") from None
    row = shape.num_layers * shape.top_k * 4
    if len(raw) != tokens * row:
        raise ResponseError(
            f"{where}: routed_experts has {len(raw)} bytes, expected {tokens} tokens x "
            f"{shape.num_layers} layers x top-{shape.top_k} int32 ({tokens * row}); does the "
            "engine serve the student's model?")
    routes = torch.from_numpy(np.frombuffer(raw, dtype=np.int32).copy())
    if routes.numel() and not 0 <= int(routes.min()) <= int(routes.max()) < shape.num_experts:
        raise ResponseError(f"{where}: routed_experts has expert ids outside "
                            f"[0, {shape.num_experts})")
    return routes.view(tokens, shape.num_layers, shape.top_k)


def parse_generations(
    resp: Any, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
    routes: RouteShape | None = None, top_k: int = 0,
) -> list[Generation]:
    """Check a batch `/generate` response with `return_logprob` (and `return_routed_experts`
    when `routes` is given, `top_logprobs_num` when `top_k > 0`) and build `Generation`s."""
    out = []
    for i, (prompt, item) in enumerate(zip(prompts, _items(resp, len(prompts)))):
        meta, ids = item["meta_info"], item.get("output_ids")
        if not isinstance(ids, list) or not all(_is_token(t) for t in ids):
            raise ResponseError(f"result {i}: output_ids must be a list of ints, got {ids!r:.200}")
        if len(ids) > sampling.max_new_tokens:
            raise ResponseError(
                f"result {i}: {len(ids)} output tokens > max_new_tokens {sampling.max_new_tokens}"
            )
        entries = meta.get("output_token_logprobs")
        if not isinstance(entries, list) or len(entries) != len(ids):
            got = len(entries) if isinstance(entries, list) else entries
            raise ResponseError(
                f"result {i}: output_token_logprobs has {got} entries for {len(ids)} output_ids"
            )
        lps = [_logprob(e, t, f"result {i} output_token_logprobs[{j}]")
               for j, (e, t) in enumerate(zip(entries, ids))]
        reason = meta.get("finish_reason")
        if not isinstance(reason, dict) or reason.get("type") not in ("stop", "length", "abort"):
            raise ResponseError(f"result {i}: bad finish_reason {reason!r}")
        if reason["type"] == "abort":
            raise ResponseError(f"result {i}: request aborted: {reason.get('message')}")
        gen = Generation(list(prompt), ids, lps, reason["type"])
        if routes is not None:
            gen.routed_experts = parse_routes(meta, len(prompt) + len(ids) - 1, routes,
                                              f"result {i}")
        if top_k > 0:
            gen.top_ids, _ = _top_rows(meta.get("output_top_logprobs"), len(ids), top_k,
                                       f"result {i} output_top_logprobs")
        out.append(gen)
    return out


def parse_scores(
    resp: Any, sequences: Sequence[Sequence[int]], response_starts: Sequence[int], top_k: int,
    token_ids: Sequence[Sequence[int]] | None = None,
) -> list[Scores]:
    """Check a batch prefill-scoring response (`logprob_start_len = r - 1`, with
    `token_ids_logprob` = one list per item when `token_ids` is given); build `Scores`."""
    out = []
    for i, (seq, r, item) in enumerate(
        zip(sequences, response_starts, _items(resp, len(sequences)))
    ):
        meta, n = item["meta_info"], len(seq) - r + 1
        entries = meta.get("input_token_logprobs")
        if not isinstance(entries, list) or len(entries) != n:
            got = len(entries) if isinstance(entries, list) else entries
            raise ResponseError(
                f"result {i}: input_token_logprobs has {got} entries, expected {n} "
                f"(sequence of {len(seq)} tokens scored from position {r})"
            )
        lps = [_logprob(entries[j], seq[r - 1 + j], f"result {i} input_token_logprobs[{j}]")
               for j in range(1, n)]
        scores = Scores(lps)
        if top_k > 0:
            rows = meta.get("input_top_logprobs")
            if not isinstance(rows, list) or not rows:
                raise ResponseError(f"result {i}: input_top_logprobs missing for top_k={top_k}")
            where = f"result {i} input_top_logprobs"
            scores.top_ids, scores.top_logprobs = _top_rows(rows[1:], n - 1, top_k, where)
        if token_ids is not None:
            scores.token_ids_logprobs = _chosen_rows(meta, token_ids[i], n - 1, f"result {i}")
        out.append(scores)
    return out


def _chosen_rows(meta: dict, ids: Sequence[int], n: int, where: str) -> list[list[float]]:
    """The n scored positions' log-probs of the requested `ids` (SGLang returns none for an
    empty list, so neither is expected)."""
    if not ids:
        return [[] for _ in range(n)]
    rows = meta.get("input_token_ids_logprobs")
    if not isinstance(rows, list) or not rows:
        raise ResponseError(f"{where}: input_token_ids_logprobs missing for token_ids_logprob "
                            f"of {len(ids)} ids")
    _, lps = _top_rows(rows[1:], n, len(ids), f"{where} input_token_ids_logprobs", ids)
    return lps
