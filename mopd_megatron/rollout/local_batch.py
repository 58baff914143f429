"""Rollout stage, embedded CPU engine core: batched, KV-cached sampling and prefill scoring.

Consumes a batch of `SeqRequest`s and produces one SGLang-shaped `/generate` result per
sample (`text`, `output_ids`, `meta_info`, as SGLang 0.5.23 writes them).

`run` looks each prompt up in the prefix cache (prompts that several rows share are
prefilled once first, as SGLang does for n > 1), prefills the uncached rest of every row in
one forward (cached KV first, then padding, then the new tokens, with explicit positions, so
padding changes nothing but float rounding), then decodes one token per step for the whole
batch. Per row: logits / T -> log-softmax gives the returned output log-prob (SGLang's
default: the temperature-scaled distribution before top-k/top-p truncation; greedy rows run
at T = 1, so unscaled); top-k then top-p truncate it before the draw. A row finishes, in
SGLang's order, on a stop string or regex in its decoded tail (`matched` = the string), on
EOS or a stop token id (`matched` = the id; none of them with ignore_eos), or on its token
budget (`length`); the finishing token stays in output_ids and `text` is trimmed as SGLang's
detokenizer trims it. Input log-probs (`logprob_start_len = j`) are len(ids) - j entries
for ids[j:], the first null, at temperature 1; `token_ids_logprob` adds the requested ids'
log-probs at the same positions, and `return_hidden_states` every forward's final hidden
states (`local_hidden.py`). Between steps the scheduler's hook runs
(pause, weight updates while paused in place) and rows it aborted finish with `abort`.
At the end each row's prompt + output KV goes into the prefix cache. With a route recorder
(`--enable-return-routed-experts`) every forward's routed experts are kept per row, beside
the KV in the prefix cache too, and a row that asked for them gets SGLang's
`meta_info["routed_experts"]` (`local_routes.py`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from mopd_megatron.rollout.local_engine import LocalModel
from mopd_megatron.rollout.local_hidden import HiddenRecorder, token_ids_rows
from mopd_megatron.rollout.local_prefix_cache import PrefixCache
from mopd_megatron.rollout.local_requests import SeqRequest
from mopd_megatron.rollout.local_routes import RouteRecorder, encode_routes


class BatchRunner:
    """Generates for batches of `SeqRequest`s on one `LocalModel`.

    Args:
        model: The model.
        cache: The prefix cache, or None to prefill every prompt in full.
        seed: Seed of the draws of rows without a `sampling_seed`.
        routes: Records the routed experts of every forward (MoE models), or None.
    """

    def __init__(self, model: LocalModel, cache: PrefixCache | None, seed: int = 0,
                 routes: RouteRecorder | None = None):
        self.model, self.cache, self.routes = model, cache, routes
        self.generator = torch.Generator().manual_seed(seed)
        self.hidden = HiddenRecorder(model.model)

    def result(self, r: SeqRequest, cached: int = 0) -> dict[str, Any]:
        """A result with no output yet (also the reply to a request aborted while queued)."""
        meta: dict[str, Any] = {"id": r.rid, "prompt_tokens": len(r.input_ids),
                                "completion_tokens": 0, "cached_tokens": cached,
                                "weight_version": self.model.weight_version}
        if r.return_logprob:
            meta.update(output_token_logprobs=[], input_token_logprobs=[])
            if r.top_logprobs_num > 0:
                meta.update(output_top_logprobs=[], input_top_logprobs=[])
            if r.token_ids_logprob:
                meta.update(output_token_ids_logprobs=[], input_token_ids_logprobs=[])
        if r.return_hidden_states:
            meta["hidden_states"] = []
        if r.aborted:
            meta["finish_reason"] = _aborted(r)
        return {"text": "", "output_ids": [], "meta_info": meta}

    @torch.inference_mode()
    def run(self, reqs: list[SeqRequest],
            between_steps: Callable[[], bool] = lambda: True) -> list[dict[str, Any]]:
        """Serve a batch: prefill, sample up to each row's budget, build SGLang results.

        Args:
            reqs: The samples.
            between_steps: Called before every sampling step; False means 'not now' (paused):
                aborted rows are finished and it is called again.
        """
        gens = [torch.Generator().manual_seed(r.sampling_seed) if r.sampling_seed is not None
                else self.generator for r in reqs]
        self._prefill_shared(reqs)
        matches = [self.cache.match(r.input_ids, r.prefix_limit()) if self.cache
                   else (0, None, None) for r in reqs]
        logits, mask, pos, kv = self._prefill(reqs, matches)
        routes = self._prefill_routes(reqs, matches, logits.shape[1])
        results = [self._prefill_result(r, c, logits[i, logits.shape[1] - len(r.input_ids) + c:])
                   for i, (r, (c, _, _)) in enumerate(zip(reqs, matches))]
        self._hidden_rows(reqs, results, [len(r.input_ids) - m[0] for r, m in zip(reqs, matches)],
                          prefill=True)
        active = [r.max_new_tokens > 0 for r in reqs]
        for r, res, on in zip(reqs, results, active):
            if not on:
                res["meta_info"]["finish_reason"] = {"type": "length", "length": 0}
        last = logits[:, -1]
        while any(active):
            proceed = between_steps()
            for i, r in enumerate(reqs):
                if active[i] and r.aborted:
                    active[i], results[i]["meta_info"]["finish_reason"] = False, _aborted(r)
            if not proceed or not any(active):
                continue
            token, token_lp, logp = self._sample(last, reqs, gens)
            for i in (i for i, on in enumerate(active) if on):
                reason = self._append(reqs[i], results[i], int(token[i]), float(token_lp[i]),
                                      logp[i])
                if reason is not None:
                    active[i], results[i]["meta_info"]["finish_reason"] = False, reason
            if any(active):
                mask = torch.cat([mask, torch.tensor(active, dtype=torch.long)[:, None]], 1)
                pos = pos[:, -1:] + 1
                last = self.model.forward(token[:, None], mask, pos, kv)[:, -1]
                self._hidden_rows(reqs, results, [int(on) for on in active], prefill=False)
                if routes is not None:
                    step = self.routes.take(len(reqs), 1)
                    for i in (i for i, on in enumerate(active) if on):
                        routes[i].append(step[i])
        routes = None if routes is None else [torch.cat(row) for row in routes]
        for i, (r, res) in enumerate(zip(reqs, results)):
            self._finish(r, res, None if routes is None else routes[i])
        if self.cache is not None:  # [layers, 2, rows, heads, columns, head_dim]
            layers = torch.stack([torch.stack([x.keys, x.values]) for x in kv.layers])
            for i, (r, res) in enumerate(zip(reqs, results)):
                cols = mask[i].nonzero()[:, 0]
                self.cache.insert((r.input_ids + res["output_ids"])[:len(cols)],
                                  layers[:, :, i][:, :, :, cols],
                                  None if routes is None else routes[i])
        return results

    # -- prefill ----------------------------------------------------------------------------

    def _prefill_shared(self, reqs: list[SeqRequest]) -> None:
        """Prefill once the cacheable prefixes that several rows share, so they all hit."""
        if self.cache is None:
            return
        keys = Counter(tuple(r.input_ids[:r.prefix_limit()]) for r in reqs)
        shared = [SeqRequest(list(k), max_new_tokens=0) for k, count in keys.items()
                  if count > 1 and k and self.cache.match(k, len(k))[0] < len(k)]
        if shared:
            self.run(shared)

    def _prefill(self, reqs: list[SeqRequest], matches: list) -> tuple:
        """One forward over every row's uncached tokens, after its cached KV.

        Columns: [cached (right-aligned in C) | new tokens (right-aligned in S)].
        """
        n, width = len(reqs), max(len(r.input_ids) - c for r, (c, _, _) in zip(reqs, matches))
        cached = max(c for c, _, _ in matches)
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, cached + width, dtype=torch.long)
        for i, (r, (c, _, _)) in enumerate(zip(reqs, matches)):
            new = len(r.input_ids) - c
            ids[i, width - new:] = torch.tensor(r.input_ids[c:])
            mask[i, cached - c:cached] = 1
            mask[i, cached + width - new:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached:]
        kv = None
        if cached:
            layers, _, heads, _, dim = next(kv for _, kv, _ in matches if kv is not None).shape
            kv = torch.zeros(layers, 2, n, heads, cached, dim)
            for i, (c, row, _) in enumerate(matches):
                if c:
                    kv[:, :, i, :, cached - c:] = row
        cache = self.model.new_cache(None if kv is None else [(k, v) for k, v in kv])
        return self.model.forward(ids, mask, pos, cache), mask, pos, cache

    def _prefill_routes(self, reqs: list[SeqRequest], matches: list,
                        width: int) -> list[list[torch.Tensor]] | None:
        """Per row, the routes of its prompt: the cached tokens' from the prefix cache, the
        rest from the prefill just run (its rows right-aligned in `width` columns)."""
        if self.routes is None:
            return None
        fresh = self.routes.take(len(reqs), width)
        rows = []
        for i, (r, (c, _, cached)) in enumerate(zip(reqs, matches)):
            if c and cached is None:
                raise RuntimeError("the prefix cache holds KV without routes")
            rows.append(([cached] if c else []) + [fresh[i, width - (len(r.input_ids) - c):]])
        return rows

    def _prefill_result(self, r: SeqRequest, cached: int, logits: torch.Tensor) -> dict:
        """The result skeleton, with input log-probs from the prefill logits of positions
        cached..len-1 ([len - cached, V])."""
        res = self.result(r, cached)
        start, meta = r.logprob_start_len, res["meta_info"]
        if r.return_logprob and 0 <= start < len(r.input_ids):
            targets = r.input_ids[start + 1:]
            logp = torch.log_softmax(logits[start - cached:len(r.input_ids) - 1 - cached], -1)
            values = logp.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
            meta["input_token_logprobs"] = self._entries(r, [None] + values, r.input_ids[start:])
            if r.top_logprobs_num > 0:
                meta["input_top_logprobs"] = [None] + self._top(r, logp)
            if r.token_ids_logprob:
                meta["input_token_ids_logprobs"] = [None] + self._chosen(r, logp)
        return res

    def _hidden_rows(self, reqs: list[SeqRequest], results: list[dict], new: list[int],
                     prefill: bool) -> None:
        """Add the last forward's final hidden states of its last `new[i]` positions to each
        row that asked, as SGLang does: a prefill as one [new][H] element, then one [H] row per
        decode step."""
        if not any(r.return_hidden_states for r in reqs):
            return
        states = self.hidden.take()
        for i, (r, res) in enumerate(zip(reqs, results)):
            if r.return_hidden_states and new[i]:
                rows = states[i, states.shape[1] - new[i]:].tolist()
                hidden = res["meta_info"]["hidden_states"]
                if prefill:
                    hidden.append(rows)
                else:
                    hidden.extend(rows)

    # -- decoding ---------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, reqs: list[SeqRequest], gens: list) -> tuple:
        """Next token and its log-prob per row; also the log-probs used for top-k output."""
        temps = torch.tensor([r.temperature for r in reqs])
        logp = torch.log_softmax(logits / temps[:, None], dim=-1)
        token = logp.argmax(-1)
        rows = [i for i, r in enumerate(reqs) if r.top_k != 1]
        if rows:
            probs, order = logp[rows].exp().sort(dim=-1, descending=True)
            top_k = torch.tensor([reqs[i].top_k for i in rows])
            top_p = torch.tensor([reqs[i].top_p for i in rows])
            rank = torch.arange(probs.shape[-1])
            drop = (rank[None] >= top_k[:, None]) | (probs.cumsum(-1) - probs > top_p[:, None])
            cdf = probs.masked_fill(drop, 0).double().cumsum(-1)
            u = torch.stack([torch.rand((), generator=gens[i]) for i in rows]).double()
            index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
            token[rows] = order.gather(1, index.clamp(max=probs.shape[-1] - 1))[:, 0]
        return token, logp.gather(1, token[:, None])[:, 0], logp

    def _append(self, r: SeqRequest, res: dict, token: int, logprob: float,
                logp: torch.Tensor) -> dict | None:
        """Add a sampled token to a row's result; its finish_reason if the row is done."""
        out, meta = res["output_ids"], res["meta_info"]
        out.append(token)
        if r.return_logprob:
            meta["output_token_logprobs"] += self._entries(r, [logprob], [token])
            if r.top_logprobs_num > 0:
                meta["output_top_logprobs"] += self._top(r, logp[None])
            if r.token_ids_logprob:
                meta["output_token_ids_logprobs"] += self._chosen(r, logp[None])
        if r.stop_tail_tokens:
            tail = self.model.tokenizer.decode(out[-r.stop_tail_tokens:])
            matched = next((s for s in r.stop_strs if s in tail), None) or next(
                (p for p in r.stop_regex if re.search(p, tail)), None)
            if matched is not None:
                return {"type": "stop", "matched": matched}
        if not r.ignore_eos and (token in r.stop_token_ids or token in self.model.eos_ids):
            return {"type": "stop", "matched": token}
        if len(out) >= r.max_new_tokens:
            return {"type": "length", "length": r.max_new_tokens}
        return None

    def _finish(self, r: SeqRequest, res: dict, routes: torch.Tensor | None) -> None:
        """Completion count, text (trimmed at the matched stop, as SGLang's detokenizer) and
        the routes asked for ([start, seqlen - 1) of the row's recorded routes)."""
        meta, out = res["meta_info"], res["output_ids"]
        meta["completion_tokens"] = len(out)
        if r.return_routed_experts and routes is not None:
            seqlen = len(r.input_ids) + len(out)
            meta["routed_experts"] = encode_routes(
                routes[min(r.routed_experts_start_len, seqlen - 1):seqlen - 1])
        meta["weight_version"] = self.model.weight_version  # at reply time, as SGLang
        tokenizer = self.model.tokenizer
        if tokenizer is not None:
            matched = meta["finish_reason"].get("matched")
            ids = out[:-1] if isinstance(matched, int) and not r.no_stop_trim else out
            text = tokenizer.decode(ids, skip_special_tokens=r.skip_special_tokens)
            if isinstance(matched, str) and (at := text.find(matched)) >= 0:
                text = text[:at + (len(matched) if r.no_stop_trim else 0)]
            res["text"] = text

    # -- formatting -------------------------------------------------------------------------

    def _entries(self, r: SeqRequest, values: list, ids: list[int]) -> list[list]:
        """[logprob, token_id, text] triples (text only with return_text_in_logprobs)."""
        texts = (self.model.tokenizer.batch_decode([[t] for t in ids])
                 if r.return_text_in_logprobs else [None] * len(ids))
        return [[v, t, s] for v, t, s in zip(values, ids, texts)]

    def _chosen(self, r: SeqRequest, logp: torch.Tensor) -> list[list[list]]:
        """[n, V] log-probs -> per row the entries of the requested `token_ids_logprob`."""
        return [self._entries(r, v, list(r.token_ids_logprob))
                for v in token_ids_rows(logp, r.token_ids_logprob)]

    def _top(self, r: SeqRequest, logp: torch.Tensor) -> list[list[list]]:
        """[n, V] log-probs -> per row the k best entries, best first."""
        vals, idx = logp.topk(r.top_logprobs_num, dim=-1)
        return [self._entries(r, v, i) for v, i in zip(vals.tolist(), idx.tolist())]


def _aborted(r: SeqRequest) -> dict:
    """SGLang's FINISH_ABORT of a request the scheduler aborted."""
    return {"type": "abort", "message": r.aborted, "status_code": None, "err_type": None}
