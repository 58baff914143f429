"""Triton backend: per-block softmax statistics (one read of the shard) and the dense gradient.

Same entry points as the chunked torch backend (`chunked.py`). Both kernels run on a
(row, column block) grid of BLOCK_V columns per program, so short and long rows alike fill
the GPU and no program holds more than 2·BLOCK_V fp32 values:

    _stats_kernel: z, u [N, V_local] -> partials [N, ⌈V_local/BLOCK_V⌉, 3 | 6] (fp32)
        (m, d, h) or (m, n, d, c, a, b) of the block, as defined in `rowstats.py`; the
        blocks of a row are merged with the ranks' in `rowstats.merge_partials`, so the
        max/sum-exp/moment merge exists in one place.
    _grad_kernel:  z, u, coef [N, 8] -> ∂/∂z [N, V_local] in the logits' dtype
        p (α + β x + γ y) + η q with x = z/τ_s − M, y = u/τ_t − N_u, p = e^{x − ln D},
        q = e^{y − ln C}; padded columns (≥ n_valid) get 0.

Traffic per element of the shard, bf16 student and teacher: forward 4 B (read z, u),
backward 6 B (read z, u, write dz), 10 B in all against the 6 B floor; the floor would need
the upstream per-token gradient inside the forward. Loads are cast to fp32 and every sum is
fp32; NEG clamps keep -inf logits and empty blocks NaN-free.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .rowstats import NEG, PAIR_STATS, STUDENT_STATS

_NEG = tl.constexpr(NEG)  # jit code reads only constexpr globals

BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _shifted(ptr, stride, row, cols, in_vocab, inv_tau, shift):
    """x = logits/τ − shift (clamped at NEG) for one block; -inf outside the vocabulary."""
    z = tl.load(ptr + row * stride + cols, mask=in_vocab, other=float("-inf")).to(tl.float32)
    return tl.maximum(z * inv_tau - shift, _NEG)


@triton.jit
def _stats_kernel(
    z_ptr,
    u_ptr,
    out_ptr,
    z_stride,
    u_stride,
    n_valid,
    inv_tau_z,
    inv_tau_u,
    HAS_TEACHER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    in_vocab = cols < n_valid
    z = _shifted(z_ptr, z_stride, row, cols, in_vocab, inv_tau_z, 0.0)
    m = tl.maximum(tl.max(z, 0), _NEG)
    x = tl.maximum(z - m, _NEG)
    e = tl.exp(x)
    d = tl.sum(e, 0)
    if HAS_TEACHER:
        out = out_ptr + (row * tl.num_programs(1) + blk) * 6
        u = _shifted(u_ptr, u_stride, row, cols, in_vocab, inv_tau_u, 0.0)
        n = tl.maximum(tl.max(u, 0), _NEG)
        y = tl.maximum(u - n, _NEG)
        eu = tl.exp(y)
        delta = x - y
        tl.store(out, m)
        tl.store(out + 1, n)
        tl.store(out + 2, d)
        tl.store(out + 3, tl.sum(eu, 0))
        tl.store(out + 4, tl.sum(e * delta, 0))
        tl.store(out + 5, tl.sum(eu * delta, 0))
    else:
        out = out_ptr + (row * tl.num_programs(1) + blk) * 3
        tl.store(out, m)
        tl.store(out + 1, d)
        tl.store(out + 2, tl.sum(e * x, 0))


@triton.jit
def _grad_kernel(
    z_ptr,
    u_ptr,
    coef_ptr,
    grad_ptr,
    z_stride,
    u_stride,
    grad_stride,
    n_valid,
    n_cols,
    inv_tau_z,
    inv_tau_u,
    HAS_TEACHER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = cols < n_valid
    coef = coef_ptr + row * 8
    x = _shifted(z_ptr, z_stride, row, cols, in_vocab, inv_tau_z, tl.load(coef))
    p = tl.exp(x - tl.load(coef + 1))
    term = tl.load(coef + 4) + tl.load(coef + 5) * x
    if HAS_TEACHER:
        y = _shifted(u_ptr, u_stride, row, cols, in_vocab, inv_tau_u, tl.load(coef + 2))
        grad = p * (term + tl.load(coef + 6) * y) + tl.load(coef + 7) * tl.exp(
            y - tl.load(coef + 3)
        )
    else:
        grad = p * term
    grad = tl.where(in_vocab, grad, 0.0)
    tl.store(
        grad_ptr + row * grad_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < n_cols
    )


def shard_stats(
    z: Tensor, u: Tensor | None, inv_tau_z: float, inv_tau_u: float, n_valid: int
) -> Tensor:
    """`chunked.shard_stats` (same arguments) with one partial per block of columns.

    Returns:
        fp32 [N, B, 3] (m, d, h) without a teacher, [N, B, 6] (m, n, d, c, a, b) with one,
        B = ⌈n_valid / block⌉ (at least 1).
    """
    teacher = u is not None
    block, warps = _tiling(n_valid)
    n_blocks = max(1, triton.cdiv(n_valid, block))
    width = PAIR_STATS if teacher else STUDENT_STATS
    out = z.new_empty(z.shape[0], n_blocks, width, dtype=torch.float32)
    if z.shape[0]:
        u = u if teacher else z
        _stats_kernel[(z.shape[0], n_blocks)](
            z,
            u,
            out,
            z.stride(0),
            u.stride(0),
            n_valid,
            inv_tau_z,
            inv_tau_u,
            HAS_TEACHER=teacher,
            BLOCK=block,
            num_warps=warps,
        )
    return out


def shard_grad(
    z: Tensor,
    u: Tensor | None,
    coef: Tensor,
    inv_tau_z: float,
    inv_tau_u: float,
    n_valid: int,
) -> Tensor:
    """`chunked.shard_grad` (same arguments and result): p(α + βx + γy) + ηq, 0 on padding."""
    grad = z.new_empty(z.shape)
    if grad.numel():
        teacher = u is not None
        u = u if teacher else z
        block, warps = _tiling(z.shape[1])
        _grad_kernel[(z.shape[0], triton.cdiv(z.shape[1], block))](
            z,
            u,
            coef.to(torch.float32).contiguous(),
            grad,
            z.stride(0),
            u.stride(0),
            grad.stride(0),
            n_valid,
            z.shape[1],
            inv_tau_z,
            inv_tau_u,
            HAS_TEACHER=teacher,
            BLOCK=block,
            num_warps=warps,
        )
    return grad


def _tiling(n_cols: int) -> tuple[int, int]:
    """(columns per program, warps): BLOCK_V, or a smaller power of two for short rows."""
    block = min(BLOCK_V, triton.next_power_of_2(max(n_cols, 16)))
    return block, max(1, min(NUM_WARPS, block // 256))
