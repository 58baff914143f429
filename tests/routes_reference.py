"""Routing replay references with transformers' Qwen3-MoE: an "engine" whose routers are
slightly perturbed (so it routes some tokens elsewhere), and a direct forward with forced
routes (the experts given, the weights from the live router's softmax at those experts).
"""

from __future__ import annotations

import torch


def _model(hf_dir, router_noise: float = 0.0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight
            gate += router_noise * gate.abs().mean() * torch.randn(gate.shape, generator=gen)
    return model


def _route(gate, hidden, forced):
    """HF's Qwen3-MoE router with the top-k ids replaced by `forced` rows that have them."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    _, live = torch.topk(probs, gate.top_k, dim=-1)
    indices = live if forced is None else torch.where((forced >= 0).all(-1, keepdim=True),
                                                      forced, live)
    weights = probs.gather(1, indices)
    weights = weights / weights.sum(-1, keepdim=True)
    return logits, weights.to(logits.dtype), indices


def engine_routes(hf_dir, tokens: torch.Tensor, router_noise: float):
    """(routes [B, S, L, k] int8, log-probs [B, S] of the next tokens) of the perturbed model."""
    model = _model(hf_dir, router_noise)
    seen = []
    for layer in model.model.layers:
        gate = layer.mlp.gate

        def forward(hidden, gate=gate):
            out = _route(gate, hidden, None)
            seen.append(out[2])
            return out

        gate.forward = forward
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits.float(), -1)
    routes = torch.stack(seen, dim=1).view(*tokens.shape, len(seen), -1).to(torch.int8)
    return routes, _next_token_logprob(logp, tokens)


def forced_forward(hf_dir, tokens: torch.Tensor, routes: torch.Tensor):
    """(the model, log-probs [B, S] with gradient) of the unperturbed model, routes forced."""
    model = _model(hf_dir)
    flat = routes.long().flatten(0, 1)  # [B*S, L, k]
    for i, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate
        gate.forward = lambda hidden, gate=gate, i=i: _route(gate, hidden, flat[:, i])
    logp = torch.log_softmax(model(tokens).logits.float(), -1)
    return model, _next_token_logprob(logp, tokens)


def _next_token_logprob(logp, tokens):
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    return logp.gather(-1, targets[..., None])[..., 0]
