"""Rollout stage, embedded CPU engine core: batched, KV-cached sampling and prefill scoring.

Consumes a batch of `SeqRequest`s (token ids + SGLang sampling/log-prob settings) and
produces one SGLang-shaped `/generate` result per sequence (`output_ids`, `meta_info`, as
SGLang 0.5.23 writes them). The model is a transformers causal LM in fp32 on CPU; the
server (`local_server.py`) merges concurrent requests into one batch for `run`.

`run` left-pads the batch, runs one prefill over it with a KV cache (explicit position ids,
so padding changes nothing but float rounding), then one decode step per new token for the
whole batch until every row has stopped (EOS or a stop token: finish `stop`; the token
budget: finish `length`). Per row: logits / T -> log-softmax gives the returned output
log-prob (SGLang's default: the temperature-scaled distribution before top-k/top-p
truncation; greedy T=0 returns the unscaled one); top-k then top-p (both measured on that
distribution, as SGLang's torch sampler) truncate it before the multinomial draw. Input
log-probs (`logprob_start_len = j`) follow SGLang: len(ids) - j entries for tokens ids[j:],
the first one null, at temperature 1.

Weights are updated in place by HF checkpoint name (`load_tensors`), so one bucket at a
time works: at start-up the transformers checkpoint conversion (e.g. Qwen3-MoE's fused
`experts.gate_up_proj` <- per-expert `gate_proj`/`up_proj`) is run backwards once on a
state dict of element indices, which maps every checkpoint tensor to the parameter elements
it fills (a contiguous block for Qwen3 and Qwen3-MoE, else an index tensor). Tied weights
share storage, so either name updates both. The CPU engine is meant for small models: it
keeps fp32 weights and builds the map with a transient float64 copy of the model's size.
"""

from __future__ import annotations

import inspect
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict


@dataclass
class SeqRequest:
    """One sequence of a `/generate` request, with its settings resolved."""

    input_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    sampling_seed: int | None = None
    """Seeds this sequence's own generator (reproducible draws whatever the batch)."""
    generator: torch.Generator | None = field(default=None, repr=False)


def _entries(values: list[float], ids: list[int]) -> list[list]:
    return [[v, t, None] for v, t in zip(values, ids)]


def _top_entries(logp: torch.Tensor, k: int) -> list[list[list]]:
    """[n, V] log-probs -> per row the k best [logprob, token_id, null], best first."""
    vals, idx = logp.topk(k, dim=-1)
    return [_entries(v, i) for v, i in zip(vals.tolist(), idx.tolist())]


class LocalModel:
    """A transformers causal LM served from CPU memory.

    Args:
        model_path: HF checkpoint folder (config, safetensors, optionally a tokenizer).
        seed: Seed of the sampling generator.
    """

    def __init__(self, model_path: str, seed: int = 0):
        self.model_path = str(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        self.model.eval()
        self.vocab_size = self.model.config.vocab_size
        eos = self.model.generation_config.eos_token_id or self.model.config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else eos or [])
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        except (OSError, ValueError):  # a checkpoint without tokenizer files: no text out
            self.tokenizer = None
        self.generator = torch.Generator().manual_seed(seed)
        self.weight_version = "default"
        # transformers 5.24 renamed the cache argument (`past_key_values` -> `cache`).
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._build_name_map()

    # -- weights --------------------------------------------------------------------------

    def _build_name_map(self) -> None:
        """Checkpoint name -> (parameter, flat element indices), via the reverted conversion."""
        state = self.model.state_dict()
        offsets, params, index_state, total = {}, [], {}, 0
        for name, tensor in state.items():
            key = tensor.untyped_storage().data_ptr()
            if key not in offsets:
                offsets[key], total = total, total + tensor.numel()
                params.append(tensor)
            index_state[name] = (torch.arange(tensor.numel(), dtype=torch.float64)
                                 + offsets[key]).view(tensor.shape)
        starts = torch.tensor([offsets[p.untyped_storage().data_ptr()] for p in params])
        self._map: dict[str, tuple[torch.Tensor, slice | torch.Tensor, tuple[int, ...]]] = {}
        for ck_name, index in revert_weight_conversion(self.model, index_state).items():
            flat = index.reshape(-1).long()
            owner = int(torch.searchsorted(starts, flat.min(), right=True)) - 1
            local = flat - starts[owner]
            if int(local.max()) >= params[owner].numel():
                raise NotImplementedError(f"checkpoint tensor {ck_name} fills several parameters")
            first = int(local[0])
            if torch.equal(local, torch.arange(first, first + local.numel())):
                local = slice(first, first + local.numel())  # a contiguous block: no index kept
            self._map[ck_name] = (params[owner], local, tuple(index.shape))
        kept = remove_tied_weights_from_state_dict(state, self.model)
        self.required_names = set(revert_weight_conversion(
            self.model, {n: index_state[n] for n in kept}))

    def load_tensors(self, tensors: dict[str, torch.Tensor], require_all: bool = False) -> None:
        """Copy checkpoint-named tensors into the model (all checked before any is written).

        Raises:
            ValueError: An unknown name, a wrong shape, or (require_all) a missing weight.
        """
        unknown = sorted(set(tensors) - set(self._map))
        if unknown:
            raise ValueError(f"unknown weight names {unknown[:5]} (e.g. {next(iter(self._map))})")
        for name, t in tensors.items():
            if tuple(t.shape) != self._map[name][2]:
                raise ValueError(f"{name}: shape {tuple(t.shape)}, the model has "
                                 f"{self._map[name][2]}")
        missing = sorted(self.required_names - set(tensors)) if require_all else []
        if missing:
            raise ValueError(f"{len(missing)} weights missing, e.g. {missing[:5]}")
        with torch.no_grad():
            for name, t in tensors.items():
                param, index, _ = self._map[name]
                param.view(-1)[index] = t.reshape(-1).to(param.dtype)

    def load_from_disk(self, model_path: str) -> None:
        """Load every `*.safetensors` file of an HF folder (all weights must be there)."""
        files = sorted(Path(model_path).glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {model_path}")
        tensors = {}
        for f in files:
            tensors.update(load_file(str(f)))
        self.load_tensors(tensors, require_all=True)
        self.model_path = str(model_path)

    # -- generation -----------------------------------------------------------------------

    def _forward(self, ids, mask, pos, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         use_cache=True, **{self._cache_arg: cache})
        return out.logits.float()

    def _sample(self, logits: torch.Tensor, reqs: list[SeqRequest]) -> tuple:
        """Next token and its log-prob per row; also the log-probs used for top-k output."""
        temps = torch.tensor([r.temperature for r in reqs])
        greedy = temps <= 0
        logp = torch.log_softmax(logits / torch.where(greedy, 1.0, temps)[:, None], dim=-1)
        token = logp.argmax(-1)
        if not bool(greedy.all()):
            probs = logp.exp()
            vocab = logp.shape[-1]
            top_k = torch.tensor([r.top_k if 0 < r.top_k < vocab else vocab for r in reqs])
            top_p = torch.tensor([r.top_p for r in reqs])
            if bool((top_k < vocab).any() or (top_p < 1).any()):
                probs, order = probs.sort(dim=-1, descending=True)
                rank = torch.arange(probs.shape[-1])
                drop = (rank[None] >= top_k[:, None]) | (probs.cumsum(-1) - probs > top_p[:, None])
                drawn = order.gather(1, self._draw(probs.masked_fill(drop, 0), reqs))[:, 0]
            else:
                drawn = self._draw(probs, reqs)[:, 0]
            token = torch.where(greedy, token, drawn)
        return token, logp.gather(1, token[:, None])[:, 0], logp

    def _draw(self, weights: torch.Tensor, reqs: list[SeqRequest]) -> torch.Tensor:
        """One index per row, with probability proportional to `weights` [n, V] (inverse CDF
        of a uniform from the row's own generator when seeded, else the engine's)."""
        u = torch.stack([torch.rand((), generator=r.generator or self.generator) for r in reqs])
        cdf = weights.double().cumsum(-1)
        index = torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True)
        return index.clamp(max=weights.shape[-1] - 1)

    @torch.inference_mode()
    def run(self, reqs: list[SeqRequest]) -> list[dict[str, Any]]:
        """Serve a batch: prefill, sample up to each row's budget, build SGLang results."""
        n, width = len(reqs), max(len(r.input_ids) for r in reqs)
        for r in reqs:
            if r.sampling_seed is not None:
                r.generator = torch.Generator().manual_seed(int(r.sampling_seed))
        ids = torch.zeros(n, width, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids)
            mask[i, width - len(r.input_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, pos, cache)
        results = [self._prefill_result(r, logits[i, width - len(r.input_ids):])
                   for i, r in enumerate(reqs)]
        done = [r.max_new_tokens <= 0 for r in reqs]
        for i, r in enumerate(reqs):
            if done[i]:
                results[i]["meta_info"]["finish_reason"] = {"type": "length", "length": 0}
        last, step = logits[:, -1], 0
        while not all(done):
            token, token_lp, logp = self._sample(last, reqs)
            tokens, lps = token.tolist(), token_lp.tolist()
            for i, r in enumerate(reqs):
                if done[i]:
                    continue
                meta = results[i]["meta_info"]
                results[i]["output_ids"].append(tokens[i])
                if r.return_logprob:
                    meta["output_token_logprobs"].append([lps[i], tokens[i], None])
                    if r.top_logprobs_num > 0:
                        meta["output_top_logprobs"] += _top_entries(logp[i:i + 1],
                                                                    r.top_logprobs_num)
                stops = set(r.stop_token_ids) | (set() if r.ignore_eos else self.eos_ids)
                if tokens[i] in stops:
                    done[i], meta["finish_reason"] = True, {"type": "stop", "matched": tokens[i]}
                elif step + 1 >= r.max_new_tokens:
                    done[i] = True
                    meta["finish_reason"] = {"type": "length", "length": r.max_new_tokens}
            if all(done):
                break
            step += 1
            mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long)], dim=1)
            pos = pos[:, -1:] + 1
            last = self._forward(token[:, None], mask, pos, cache)[:, -1]
        for res in results:
            meta, out = res["meta_info"], res["output_ids"]
            meta["completion_tokens"] = len(out)
            if self.tokenizer is not None:
                res["text"] = self.tokenizer.decode(out, skip_special_tokens=True)
        return results

    def _prefill_result(self, r: SeqRequest, logits: torch.Tensor) -> dict[str, Any]:
        """The result skeleton, with input log-probs from the prefill logits [len, V]."""
        meta: dict[str, Any] = {"id": uuid.uuid4().hex, "prompt_tokens": len(r.input_ids),
                                "cached_tokens": 0, "weight_version": self.weight_version}
        if r.return_logprob:
            meta.update(output_token_logprobs=[], input_token_logprobs=[])
            if r.top_logprobs_num > 0:
                meta.update(output_top_logprobs=[], input_top_logprobs=[])
            start = r.logprob_start_len
            if 0 <= start < len(r.input_ids):
                targets = r.input_ids[start + 1:]
                logp = torch.log_softmax(logits[start:len(r.input_ids) - 1], dim=-1)
                values = logp.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
                meta["input_token_logprobs"] = _entries([None] + values, r.input_ids[start:])
                if r.top_logprobs_num > 0:
                    meta["input_top_logprobs"] = [None] + _top_entries(logp, r.top_logprobs_num)
        return {"text": "", "output_ids": [], "meta_info": meta}
