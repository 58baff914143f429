"""Pure-torch full-vocabulary reference of every kernel quantity (the test oracle).

Takes unsharded logits [N, V] (V may include Megatron's padded columns, masked with
`vocab_size`), computes in the input dtype promoted to at least fp32 (pass fp64 for an
oracle), and is differentiable by plain autograd. With z = logits/τ_s, u = teacher/τ_t,
p = softmax(z), q = softmax(u):

    logprob_y  = log p_y,                 entropy = −Σ_v p_v log p_v
    reverse KL = Σ_v p_v (log p_v − log q_v)   (KL(p‖q))
    forward KL = Σ_v q_v (log q_v − log p_v)   (KL(q‖p))
    top-k      = Σ_{v∈S} [p_v (log p_v − log q_v) − p_v + q_v],  S = teacher top-k ids

Terms with zero weight (p_v = 0, or q_v = 0 for forward KL) count as 0, as 0·log 0 = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def log_softmax(logits: Tensor, temperature: float = 1.0, vocab_size: int | None = None) -> Tensor:
    """log softmax(logits/τ) over the first `vocab_size` columns; padded columns are -inf."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if vocab_size is not None and vocab_size < z.shape[-1]:
        z = z.masked_fill(torch.arange(z.shape[-1], device=z.device) >= vocab_size, -torch.inf)
    return torch.log_softmax(z, -1)


def logprob_entropy(
    logits: Tensor, target: Tensor, *, temperature: float = 1.0, vocab_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """(log p_target [N], entropy [N]) of softmax(logits/τ) for full logits [N, V]."""
    lp = log_softmax(logits, temperature, vocab_size)
    p = lp.exp()
    return lp.gather(1, target[:, None])[:, 0], -_weighted(p, lp).sum(1)


def kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "reverse",
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    loss_mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-token KL(p‖q) (`kind="reverse"`) or KL(q‖p) (`"forward"`) [N]; masked rows 0."""
    lp = log_softmax(student_logits, student_temperature, vocab_size)
    lq = log_softmax(teacher_logits, teacher_temperature, vocab_size).detach()
    if kind not in ("reverse", "forward"):
        raise ValueError(f"kind must be 'reverse' or 'forward', got {kind!r}")
    w, v = (lp.exp(), lp - lq) if kind == "reverse" else (lq.exp(), lq - lp)
    if loss_mask is None:
        return _weighted(w, v).sum(1)
    active = loss_mask.bool()
    return torch.where(active, _weighted(w, v, active[:, None]).sum(1), 0)


def topk_reverse_kl(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> Tensor:
    """Corrected teacher top-k loss [N]; ids [N, k] (global, -1 = padding), log q [N, k]."""
    lp_all = log_softmax(student_logits, temperature, vocab_size)
    valid = teacher_topk_ids >= 0
    lp = lp_all.gather(1, teacher_topk_ids.clamp_min(0))
    lq = teacher_topk_logprobs.to(lp.dtype)
    p, q = lp.exp(), lq.exp()
    return torch.where(valid, _weighted(p, lp - lq) - p + q, 0).sum(1)


def _weighted(w: Tensor, v: Tensor, keep: Tensor | bool = True) -> Tensor:
    """w·v with 0 where w == 0 or not `keep` (and a NaN-free gradient there)."""
    return w * torch.where((w > 0) & keep, v, 0)
