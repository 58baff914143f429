"""Rollout stage, embedded CPU engine model: a transformers causal LM, its weights and a forward.

Consumes an HF checkpoint folder; produces `LocalModel`: the fp32 model on CPU, its tokenizer
(when the folder has one), its EOS ids, `forward` (logits of a batch with a KV cache) and
in-place weight updates by HF checkpoint name (`load_tensors`, `load_from_disk`). Sampling,
batching and the SGLang result shapes are `local_batch.py`'s.

Weights are updated in place by HF checkpoint name, so one bucket at a time works: at
start-up the transformers checkpoint conversion (e.g. Qwen3-MoE's fused
`experts.gate_up_proj` <- per-expert `gate_proj`/`up_proj`) is run backwards once on a
state dict of element indices, which maps every checkpoint tensor to the parameter elements
it fills (a contiguous block for Qwen3 and Qwen3-MoE, else an index tensor). Tied weights
share storage, so either name updates both. The CPU engine is meant for small models: it
keeps fp32 weights and builds the map with a transient float64 copy of the model's size.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict


class LocalModel:
    """A transformers causal LM served from CPU memory.

    Args:
        model_path: HF checkpoint folder (config, safetensors, optionally a tokenizer).
    """

    def __init__(self, model_path: str):
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
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)  # SGLang stops on both
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

    # -- forward --------------------------------------------------------------------------

    def new_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
        """A KV cache for `forward`, optionally filled with per-layer [n, heads, t, dim] KV."""
        return DynamicCache(ddp_cache_data=kv, config=self.model.config)

    def cache_is_plain(self) -> bool:
        """Whether every layer keeps all past keys (no sliding window) with the same KV heads,
        so prefixes can be cached as one tensor and reused exactly."""
        config = self.model.config.get_text_config(decoder=True)
        return isinstance(getattr(config, "num_key_value_heads", None), int) and all(
            type(layer) is DynamicLayer for layer in self.new_cache().layers)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                cache: DynamicCache) -> torch.Tensor:
        """Logits [n, len, V] (fp32) of token ids [n, len] after the cache's tokens.

        Args:
            ids: Token ids; padding anywhere is allowed.
            mask: [n, cached + len] 1 for real tokens (cache columns first).
            pos: [n, len] position of each token in its own sequence.
            cache: Extended in place with the new tokens' keys and values.
        """
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         use_cache=True, **{self._cache_arg: cache})
        return out.logits.float()
