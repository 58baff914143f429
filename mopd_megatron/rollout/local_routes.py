"""Rollout stage, embedded CPU engine: the experts every MoE layer routes each token to.

SGLang with `--enable-return-routed-experts` captures, in every forward, each token's top-k
expert ids per decoder layer into a buffer indexed by KV-cache slot, so a token keeps the
route it was computed with, also when a later request reuses its KV from the prefix cache.
A request with `return_routed_experts` then gets `meta_info["routed_experts"]`: the base64
bytes of an int32 array [seqlen - 1 - start, num_hidden_layers, top_k] for the positions
[routed_experts_start_len, seqlen - 1), seqlen = prompt + output tokens (the last token is
never run through the model). Dense layers' rows are zeros (SGLang's buffer is zero-filled
and only MoE layers write it).

`RouteRecorder` does the capture here: a forward hook on each MoE layer's router (the
transformers Qwen3-MoE and DeepSeek-V3 routers return `(logits, weights, top-k ids)`) keeps
the ids of the last forward; `take` returns them as [rows, tokens, layers, top_k].
"""

from __future__ import annotations

import base64

import torch


class RouteRecorder:
    """Captures the top-k expert ids of every MoE layer of a transformers causal LM.

    Args:
        model: The model (its decoder layers are `model.get_decoder().layers`).

    Raises:
        ValueError: The model has no MoE layer with a router this recorder understands.
    """

    def __init__(self, model: torch.nn.Module):
        config = model.config.get_text_config(decoder=True)
        self.num_layers, self.top_k = config.num_hidden_layers, config.num_experts_per_tok
        layers = model.get_decoder().layers
        routers = {i: layer.mlp.gate for i, layer in enumerate(layers)
                   if hasattr(layer.mlp, "experts") and hasattr(layer.mlp, "gate")}
        if not routers:
            raise ValueError(f"{type(model).__name__} has no MoE router to record routes from")
        self._ids: dict[int, torch.Tensor] = {}
        for index, router in routers.items():
            router.register_forward_hook(self._hook(index))

    def _hook(self, index: int):
        def keep(module, args, output) -> None:
            self._ids[index] = output[-1]
        return keep

    def take(self, rows: int, tokens: int) -> torch.Tensor:
        """The routes of the last forward, [rows, tokens, layers, top_k] int32 (0 for dense
        layers), and forget them."""
        out = torch.zeros(rows * tokens, self.num_layers, self.top_k, dtype=torch.int32)
        for index, ids in self._ids.items():
            out[:, index] = ids.reshape(rows * tokens, self.top_k)
        self._ids.clear()
        return out.view(rows, tokens, self.num_layers, self.top_k)


def encode_routes(routes: torch.Tensor) -> str:
    """SGLang's wire format: base64 of the int32 array's bytes."""
    return base64.b64encode(routes.to(torch.int32).contiguous().numpy().tobytes()).decode()
