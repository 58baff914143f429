"""Per-row softmax statistics of vocabulary blocks, their exact merge, and the gradient form.

Shared by the chunked torch backend and the Triton backend: everything here works on
[N]-, [N, B]- or [N, k]-sized tensors, never on a whole [N, V] shard.

Notation for one row: z = student logits / τ_s, u = teacher logits / τ_t, both over the
row's non-padded columns; p = softmax(z), q = softmax(u).

Partial statistics `part` [N, B, C] describe B blocks of columns (one block per chunked-torch
row, ⌈V_local/BLOCK⌉ blocks per Triton row). Every block's maxima are clamped below at
NEG = -1e30 and its shifted logits x = z − m likewise, so -inf logits (and empty blocks) give
probability 0 without NaNs.

    student only, C = 3:  m = max z,  d = Σ e^{z−m},  h = Σ e^{z−m}(z−m)
    with teacher,  C = 6:  m,  n = max u,  d,  c = Σ e^{u−n},
                           a = Σ e^{z−m} δ',  b = Σ e^{u−n} δ',  δ' = (z−m) − (u−n)

Merge over blocks and TP ranks (1 all-reduce MAX on [N, 1|2], 1 all-reduce SUM on
[N, 2|4 + extra]): M = max m, N_u = max n, s = e^{m−M}, s_u = e^{n−N_u}, t = m − M, t_u = n − N_u,

    D = Σ s d,  Hm = Σ s (h + t d),  C = Σ s_u c,
    A = Σ s (a + d (t − t_u)),  B = Σ s_u (b + c (t − t_u)),

after which ln Σ e^z = M + ln D, entropy = ln D − Hm/D, E_p[δ] = A/D + M − N_u and
E_q[δ] = B/C + M − N_u with δ = z − u.

Backward: every gradient here is the dense form, per column v,

    ∂/∂z_raw,v = p_v (α + β x_v + γ y_v) + η q_v,    x = z − M, y = u − N_u,

with p = e^{x − ln D}, q = e^{y − ln C} and the per-row coefficients `coef` [N, 8] =
(M, ln D, N_u, ln C, α, β, γ, η) (α..η already hold the upstream gradient and 1/τ_s), plus a
sparse term at a few columns per row (the target token, or a teacher's top-k ids) that
`scatter_exact` writes with a single rounding.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

NEG = -1e30
STUDENT_STATS = 3
PAIR_STATS = 6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 logits, fp64 for fp64 logits (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def merge_partials(
    part: Tensor, group: dist.ProcessGroup | None, extra: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Merge block statistics over blocks and over the ranks of `group`.

    Args:
        part: [N, B, 3] student-only or [N, B, 6] student+teacher partials (layout above).
        group: tensor-parallel group, or None for a single shard.
        extra: optional [N, k] values summed over ranks in the same all-reduce (a gathered
            target logit that only its owner rank holds, others 0).

    Returns:
        ([N, 3] (M, D, Hm) or [N, 6] (M, N_u, D, C, A, B), the summed `extra` or None).
    """
    paired = part.shape[-1] == PAIR_STATS
    n_max = 2 if paired else 1
    maxima = part[..., :n_max].amax(1)
    if _distributed(group):
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    shift = part[..., :n_max] - maxima[:, None]
    scale = shift.exp()
    if paired:
        s, s_u = scale.unbind(-1)
        t, t_u = shift.unbind(-1)
        d, c, a, b = part[..., 2:].unbind(-1)
        dt = t - t_u
        sums = torch.stack([s * d, s_u * c, s * (a + d * dt), s_u * (b + c * dt)], -1).sum(1)
    else:
        s, t = scale[..., 0], shift[..., 0]
        d, h = part[..., 1], part[..., 2]
        sums = torch.stack([s * d, s * (h + d * t)], -1).sum(1)
    if extra is not None:
        sums = torch.cat([sums, extra.to(sums.dtype)], 1)
    if _distributed(group):
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    n_sums = sums.shape[1] - (0 if extra is None else extra.shape[1])
    merged = torch.cat([maxima, sums[:, :n_sums]], 1)
    return merged, (None if extra is None else sums[:, n_sums:])


def pack_coefs(
    m_z: Tensor,
    log_d: Tensor,
    alpha: Tensor,
    beta: Tensor | float = 0.0,
    *,
    m_u: Tensor | float = 0.0,
    log_c: Tensor | float = float("inf"),
    gamma: Tensor | float = 0.0,
    eta: Tensor | float = 0.0,
    active: Tensor | None = None,
) -> Tensor:
    """Stack the per-row backward coefficients into [N, 8] = (M, ln D, N_u, ln C, α, β, γ, η).

    ln D and ln C are the log-normalisers of the max-shifted logits. Rows where `active` is
    False get ln D = ln C = inf and zero weights, so their gradient is exactly 0 whatever
    their logits.
    """
    cols = [m_z, log_d, m_u, log_c, alpha, beta, gamma, eta]
    like = {"dtype": m_z.dtype, "device": m_z.device}
    coef = torch.stack([torch.as_tensor(c, **like).expand_as(m_z) for c in cols], 1)
    if active is not None:
        idle = torch.tensor([0, float("inf"), 0, float("inf"), 0, 0, 0, 0], **like)
        coef = torch.where(active[:, None], coef, idle)
    return coef


def dense_grad(x: Tensor, coef: Tensor, y: Tensor | None = None) -> Tensor:
    """p (α + β x + γ y) + η q for shifted logits x = z − M (and y = u − N_u), in place.

    Args:
        x: [R, C] z − M (clamped at NEG); overwritten.
        coef: [R, 8] coefficients (`pack_coefs`).
        y: [R, C] u − N_u (clamped at NEG) or None when there is no teacher term; overwritten.

    Returns:
        [R, C] gradient in x's dtype (the storage of x).
    """
    log_d, log_c, alpha, beta, gamma, eta = (coef[:, i : i + 1] for i in (1, 3, 4, 5, 6, 7))
    p = (x - log_d).exp_()
    term = x.mul_(beta).add_(alpha)
    if y is not None:
        term.addcmul_(y, gamma)
        q = y.sub_(log_c).exp_()
        return term.mul_(p).addcmul_(q, eta)
    return term.mul_(p)


def local_ids(ids: Tensor, rank: int, v_local: int, n_valid: int) -> Tensor:
    """Map global vocabulary ids [N, k] to this shard's columns; -1 where not owned or invalid."""
    lids = ids - rank * v_local
    return torch.where((ids >= 0) & (lids >= 0) & (lids < n_valid), lids, -1)


def gather_scaled(logits: Tensor, lids: Tensor, inv_tau: float) -> Tensor:
    """z = logits/τ at local ids [N, k] in the compute dtype; 0 where the id is -1."""
    vals = logits.gather(1, lids.clamp_min(0)).to(compute_dtype(logits.dtype)) * inv_tau
    return torch.where(lids >= 0, vals, 0)


def scatter_exact(grad: Tensor, lids: Tensor, vals: Tensor) -> None:
    """Overwrite grad[i, lids[i, j]] = vals[i, j] (cast once) where lids >= 0, in place.

    No host sync: entries with lid -1 are pointed at the row's first valid column with that
    column's value (or at column 0 with its current value), so every duplicate index writes
    the same number. Valid ids must be unique within a row.
    """
    valid = lids >= 0
    vals = vals.to(grad.dtype)
    first = valid.to(torch.int32).argmax(1, keepdim=True)
    anchor = lids.gather(1, first).clamp_min(0)
    anchor_val = torch.where(
        valid.any(1, keepdim=True), vals.gather(1, first), grad.gather(1, anchor)
    )
    grad.scatter_(1, torch.where(valid, lids, anchor), torch.where(valid, vals, anchor_val))


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return group is not None and dist.get_world_size(group) > 1
