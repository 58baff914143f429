"""Chunked pure-torch backend: per-shard softmax statistics and the dense gradient.

The same two entry points as the Triton backend (`triton_kl.py`), for CPU training and for
GPUs without Triton. Rows are processed in chunks of about `CHUNK_ELEMENTS` logits, so the
fp32 temporaries are bounded by a few [rows, V_local] chunks, never an [N, V_local] copy.

    shard_stats: logits z [N, V_local] (and teacher u) -> partials [N, 1, 3 | 6]
    shard_grad:  logits, coefficients [N, 8] -> ∂/∂z [N, V_local] in the logits' dtype

See `rowstats.py` for the statistics, their merge and the gradient form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rowstats import NEG, PAIR_STATS, STUDENT_STATS, compute_dtype, dense_grad

CHUNK_ELEMENTS = 1 << 20


def shard_stats(
    z: Tensor, u: Tensor | None, inv_tau_z: float, inv_tau_u: float, n_valid: int
) -> Tensor:
    """Softmax partial statistics of each row's first `n_valid` columns (one block per row).

    Args:
        z: [N, V_local] student logits (any float dtype, unit column stride).
        u: [N, V_local] teacher logits or None.
        inv_tau_z: 1/τ_s.
        inv_tau_u: 1/τ_t.
        n_valid: number of non-padded columns of this shard.

    Returns:
        [N, 1, 3] (m, d, h) without a teacher, [N, 1, 6] (m, n, d, c, a, b) with one.
    """
    width = STUDENT_STATS if u is None else PAIR_STATS
    out = torch.empty(z.shape[0], 1, width, dtype=compute_dtype(z.dtype), device=z.device)
    for rows in _chunks(z):
        m, x = _shifted(z[rows, :n_valid], inv_tau_z, out.dtype)
        e = x.exp()
        d = e.sum(1)
        h = _rowdot(e, x)
        if u is None:
            out[rows, 0] = torch.stack([m, d, h], 1)
            continue
        n, y = _shifted(u[rows, :n_valid], inv_tau_u, out.dtype)
        eu = y.exp()
        a = h - _rowdot(e, y)
        b = _rowdot(eu, x) - _rowdot(eu, y)
        out[rows, 0] = torch.stack([m, n, d, eu.sum(1), a, b], 1)
    return out


def shard_grad(
    z: Tensor,
    u: Tensor | None,
    coef: Tensor,
    inv_tau_z: float,
    inv_tau_u: float,
    n_valid: int,
) -> Tensor:
    """Dense gradient p(α + βx + γy) + ηq per column; padded columns get 0.

    Args:
        z: [N, V_local] student logits.
        u: [N, V_local] teacher logits, or None when γ = η = 0.
        coef: [N, 8] per-row coefficients (`rowstats.pack_coefs`).
        inv_tau_z: 1/τ_s.
        inv_tau_u: 1/τ_t.
        n_valid: number of non-padded columns of this shard.

    Returns:
        [N, V_local] gradient in z's dtype.
    """
    grad = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    grad[:, n_valid:] = 0
    coef = coef.to(compute_dtype(z.dtype))
    for rows in _chunks(z):
        c = coef[rows]
        x = _shift_by(z[rows, :n_valid], inv_tau_z, c[:, 0])
        y = None if u is None else _shift_by(u[rows, :n_valid], inv_tau_u, c[:, 2])
        grad[rows, :n_valid] = dense_grad(x, c, y)
    return grad


def _chunks(z: Tensor):
    step = max(1, CHUNK_ELEMENTS // max(1, z.shape[1]))
    return (slice(i, i + step) for i in range(0, z.shape[0], step))


def _shifted(block: Tensor, inv_tau: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(m, x): row max of block·inv_tau (≥ NEG) and x = block·inv_tau − m (≥ NEG), fresh."""
    if block.shape[1]:
        m = (block.amax(1).to(dtype) * inv_tau).clamp_(min=NEG)
    else:
        m = block.new_full(block.shape[:1], NEG, dtype=dtype)
    return m, _shift_by(block, inv_tau, m)


def _shift_by(block: Tensor, inv_tau: float, m: Tensor) -> Tensor:
    """block·inv_tau − m (clamped at NEG) in m's dtype, as a fresh tensor."""
    # Both forms take one pass; on CPU torch.add with alpha=1 is several times slower.
    if inv_tau == 1:
        return (block - m[:, None]).clamp_(min=NEG)
    return torch.add(-m[:, None], block, alpha=inv_tau).clamp_(min=NEG)


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_v a_v b_v per row without an [R, C] temporary."""
    return torch.linalg.vecdot(a, b, dim=1)
