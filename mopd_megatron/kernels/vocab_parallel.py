"""Public vocab-parallel log-prob/entropy, full-vocabulary KL and teacher top-k losses.

Each rank holds its shard of the logits, [N, V_local], covering global vocabulary ids
[rank·V_local, (rank+1)·V_local); global columns ≥ `vocab_size` are Megatron padding and are
masked. Nothing [N, V]-sized is gathered: a backend reduces each row of the shard to a few
fp32 statistics, `rowstats.merge_partials` merges them across the TP group (1 all-reduce MAX
and 1 all-reduce SUM on [N, ≤ 4 + k] tensors), and the backward writes the closed-form
gradient with no collective:

    log p_y = z_y − lse(z),   H = −Σ p log p,      ∂/∂z: 1[v=y] − p,  −p (log p + H)
    KL(p‖q) = E_p[z − u] − lse(z) + lse(u),        ∂/∂z: p (δ − E_p δ),  δ = z − u
    KL(q‖p) = −E_q[z − u] − lse(u) + lse(z),       ∂/∂z: p − q
    top-k   = Σ_{v∈S} [p_v (log p_v − log q_v) − p_v + q_v],
              ∂/∂z_j = 1[j∈S] w_j − p_j Σ_{v∈S} w_v,  w_v = p_v (log p_v − log q_v)

with z = student logits/τ_s and u = teacher logits/τ_t (gradients w.r.t. the raw logits carry
a further 1/τ_s). Outputs are fp32 [N] (fp64 for fp64 logits); gradients come back in the
logits' dtype. Logits must be 2-D: flatten [s, b, V_local] with reshape (a view when the
leading dims are contiguous). Any row stride is read in place; a column stride other than 1
costs a copy. -inf logits are fine wherever the weighting distribution (p for reverse KL and
entropy, q for forward KL) is 0 too; a KL that is truly infinite comes out huge but finite
(-inf is clamped at -1e30). Gradients go to a fresh buffer, not into the logits' storage:
the same logits often feed several losses (log-prob and KL) in one step.

Backend choice, `MOPD_KL_IMPL` in {auto, triton, torch, reference}: auto takes the Triton
kernels for CUDA tensors and the chunked torch implementation otherwise; `triton` forces the
kernels (on CPU they need TRITON_INTERPRET=1 set before the first call); `reference` runs the
unsharded fp64-capable reference (TP = 1 only).
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor

from . import chunked, reference
from .rowstats import (
    NEG,
    dense_grad,
    gather_scaled,
    local_ids,
    merge_partials,
    pack_coefs,
    scatter_exact,
)

IMPLS = ("auto", "triton", "torch", "reference")


def _or_reference(reference_fn):
    """Under MOPD_KL_IMPL=reference, route the call to `reference_fn`: same parameter names,
    minus `tp_group`, which must then span one rank."""

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            logits = next(iter(bound.arguments.values()))
            if _impl(logits) != "reference":
                return fn(*args, **kwargs)
            group = bound.arguments.pop("tp_group", None)
            if group is not None and dist.get_world_size(group) > 1:
                raise ValueError("MOPD_KL_IMPL=reference takes full unsharded logits (TP = 1)")
            return reference_fn(**bound.arguments)

        return call

    return decorate


@_or_reference(reference.logprob_entropy)
def vocab_parallel_logprob_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probability of the target token and entropy of softmax(logits/τ), per row.

    Args:
        logits: [N, V_local] this rank's vocabulary shard (fp32/bf16/fp16/fp64).
        target: [N] global token ids in [0, vocab_size) (a row with any other id gets a
            meaningless log-prob and no target gradient).
        tp_group: tensor-parallel group over which the vocabulary is split (None: unsplit).
        temperature: τ > 0 dividing the logits.
        vocab_size: real vocabulary size; global columns at or past it are masked.

    Returns:
        (logprob [N], entropy [N]), both differentiable w.r.t. `logits`.
    """
    logits = _matrix(logits, "logits")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be [N]={logits.shape[:1]}, got {tuple(target.shape)}")
    _check_temperature(temperature)
    shard = _Shard.of(logits, tp_group, vocab_size)
    return _LogprobEntropy.apply(logits, target.long(), temperature, shard)


@_or_reference(reference.kl)
def vocab_parallel_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "reverse",
    tp_group: dist.ProcessGroup | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    loss_mask: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-token full-vocabulary KL between student p and teacher q.

    Args:
        student_logits: [N, V_local] student shard.
        teacher_logits: [N, V_local] teacher shard (same columns; any float dtype; treated
            as a constant).
        kind: "reverse" for KL(p‖q), "forward" for KL(q‖p).
        tp_group: tensor-parallel group over which the vocabulary is split.
        student_temperature: τ_s, p = softmax(student/τ_s).
        teacher_temperature: τ_t, q = softmax(teacher/τ_t).
        loss_mask: [N] bool or 0/1; rows where it is 0 give 0 and a zero gradient.
        vocab_size: real vocabulary size; global columns at or past it are masked.

    Returns:
        [N] KL per token, differentiable w.r.t. `student_logits` only.
    """
    if kind not in ("reverse", "forward"):
        raise ValueError(f"kind must be 'reverse' or 'forward', got {kind!r}")
    z = _matrix(student_logits, "student_logits")
    u = _matrix(teacher_logits.detach(), "teacher_logits")
    if u.shape != z.shape:
        raise ValueError(f"teacher_logits {tuple(u.shape)} != student_logits {tuple(z.shape)}")
    if loss_mask is not None and loss_mask.shape != z.shape[:1]:
        raise ValueError(f"loss_mask must be [N]={z.shape[:1]}, got {tuple(loss_mask.shape)}")
    _check_temperature(student_temperature)
    _check_temperature(teacher_temperature)
    shard = _Shard.of(z, tp_group, vocab_size)
    active = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if loss_mask is not None:
        active = loss_mask.to(device=z.device) != 0
    temps = (student_temperature, teacher_temperature)
    return _KL.apply(z, u, kind == "reverse", temps, active, shard)


@_or_reference(reference.topk_reverse_kl)
def topk_reverse_kl(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> Tensor:
    """The MOPD paper's corrected teacher top-k loss, per token.

    Σ_{v∈S} [p_v (log p_v − log q_v) − p_v + q_v] over the teacher's top-k set S; equals
    KL(p‖q) when S is the whole vocabulary.

    Args:
        student_logits: [N, V_local] student shard.
        teacher_topk_ids: [N, k] global ids, unique per row; -1 marks padding (ignored).
        teacher_topk_logprobs: [N, k] teacher log-probabilities log q_v (a constant).
        tp_group: tensor-parallel group over which the vocabulary is split.
        temperature: τ_s, p = softmax(student/τ_s).
        vocab_size: real vocabulary size; ids at or past it are ignored like -1.

    Returns:
        [N] loss per token, differentiable w.r.t. `student_logits`.
    """
    z = _matrix(student_logits, "student_logits")
    if teacher_topk_ids.dim() != 2 or teacher_topk_ids.shape[0] != z.shape[0]:
        raise ValueError(
            f"teacher_topk_ids must be [N={z.shape[0]}, k], got {tuple(teacher_topk_ids.shape)}"
        )
    if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"teacher_topk_logprobs {tuple(teacher_topk_logprobs.shape)} != "
            f"teacher_topk_ids {tuple(teacher_topk_ids.shape)}"
        )
    _check_temperature(temperature)
    shard = _Shard.of(z, tp_group, vocab_size)
    return _TopkReverseKL.apply(
        z, teacher_topk_ids.long(), teacher_topk_logprobs.detach(), temperature, shard
    )


@dataclass(frozen=True)
class _Shard:
    """Where this rank's columns sit in the vocabulary, and which backend computes on them."""

    group: dist.ProcessGroup | None
    rank: int
    v_local: int
    n_valid: int
    vocab_size: int
    backend: ModuleType

    @classmethod
    def of(cls, logits: Tensor, group, vocab_size: int | None) -> _Shard:
        tp = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        v_local = logits.shape[1]
        vocab = v_local * tp if vocab_size is None else vocab_size
        if not 0 < vocab <= v_local * tp:
            raise ValueError(
                f"vocab_size={vocab} must be in (0, {v_local * tp}] (V_local={v_local} × tp={tp})"
            )
        n_valid = min(v_local, max(0, vocab - rank * v_local))
        return cls(group, rank, v_local, n_valid, vocab, _backend(_impl(logits)))

    def local_ids(self, ids: Tensor) -> Tensor:
        return local_ids(ids, self.rank, self.v_local, self.n_valid)

    def student_grad(
        self, logits: Tensor, coef: Tensor, inv_tau: float, lids: Tensor, sparse: Tensor
    ) -> Tensor:
        """Dense gradient p(α + βx) plus `sparse` [N, k] at local ids `lids`, exactly rounded."""
        grad = self.backend.shard_grad(logits, None, coef, inv_tau, 1.0, self.n_valid)
        x = (gather_scaled(logits, lids, inv_tau) - coef[:, :1]).clamp_(min=NEG)
        scatter_exact(grad, lids, dense_grad(x, coef) + sparse)
        return grad


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, temperature, shard):
        inv_tau = 1.0 / temperature
        part = shard.backend.shard_stats(logits, None, inv_tau, 1.0, shard.n_valid)
        lids = shard.local_ids(target[:, None])
        stats, z_y = merge_partials(part, shard.group, gather_scaled(logits, lids, inv_tau))
        m, d, h = stats.unbind(1)
        log_d = d.log()
        entropy = log_d - h / d
        ctx.save_for_backward(logits, lids, m, log_d, entropy)
        ctx.inv_tau, ctx.shard = inv_tau, shard
        return z_y[:, 0] - m - log_d, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, lids, m, log_d, entropy = ctx.saved_tensors
        g_lp, g_ent = g_lp * ctx.inv_tau, g_ent * ctx.inv_tau
        coef = pack_coefs(m, log_d, -(g_lp + g_ent * (entropy - log_d)), -g_ent)
        grad = ctx.shard.student_grad(logits, coef, ctx.inv_tau, lids, g_lp[:, None])
        return grad, None, None, None


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, u, reverse, temperatures, active, shard):
        inv_s, inv_t = 1.0 / temperatures[0], 1.0 / temperatures[1]
        part = shard.backend.shard_stats(z, u, inv_s, inv_t, shard.n_valid)
        stats, _ = merge_partials(part, shard.group)
        m, n, d, c, a, b = stats.unbind(1)
        log_d, log_c = d.log(), c.log()
        mu = a / d
        kl = mu - log_d + log_c if reverse else log_d - log_c - b / c
        ctx.save_for_backward(z, u, m, n, log_d, log_c, mu, active)
        ctx.reverse, ctx.inv, ctx.shard = reverse, (inv_s, inv_t), shard
        return torch.where(active, kl, 0)

    @staticmethod
    def backward(ctx, g):
        z, u, m, n, log_d, log_c, mu, active = ctx.saved_tensors
        g = g * ctx.inv[0]
        if ctx.reverse:  # p (x − y − μ)
            coef = pack_coefs(m, log_d, -g * mu, g, m_u=n, log_c=log_c, gamma=-g, active=active)
        else:  # p − q
            coef = pack_coefs(m, log_d, g, m_u=n, log_c=log_c, eta=-g, active=active)
        grad = ctx.shard.backend.shard_grad(z, u, coef, *ctx.inv, ctx.shard.n_valid)
        return grad, None, None, None, None, None


class _TopkReverseKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, ids, log_q, temperature, shard):
        inv_tau = 1.0 / temperature
        part = shard.backend.shard_stats(z, None, inv_tau, 1.0, shard.n_valid)
        lids = shard.local_ids(ids)
        stats, z_k = merge_partials(part, shard.group, gather_scaled(z, lids, inv_tau))
        m, d, _ = stats.unbind(1)
        log_d = d.log()
        log_p = z_k - m[:, None] - log_d[:, None]
        log_q = log_q.to(log_p.dtype)
        p, q = log_p.exp(), log_q.exp()
        valid = (ids >= 0) & (ids < shard.vocab_size)
        w = torch.where(valid & (p > 0), p * (log_p - log_q), 0)
        ctx.save_for_backward(z, lids, m, log_d, w)
        ctx.inv_tau, ctx.shard = inv_tau, shard
        return (w - torch.where(valid, p - q, 0)).sum(1)

    @staticmethod
    def backward(ctx, g):
        z, lids, m, log_d, w = ctx.saved_tensors
        g = g * ctx.inv_tau
        coef = pack_coefs(m, log_d, -w.sum(1) * g)
        grad = ctx.shard.student_grad(z, coef, ctx.inv_tau, lids, w * g[:, None])
        return grad, None, None, None, None


def _impl(logits: Tensor) -> str:
    impl = os.environ.get("MOPD_KL_IMPL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"MOPD_KL_IMPL={impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "triton" if logits.is_cuda else "torch"
    return impl


def _backend(impl: str) -> ModuleType:
    if impl == "triton":
        # Imported on first use: importing Triton is slow, and on CPU the kernels must be
        # defined after TRITON_INTERPRET=1 is set.
        from . import triton_kl

        return triton_kl
    return chunked


def _matrix(t: Tensor, name: str) -> Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be [N, V_local], got shape {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def _check_temperature(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
