"""Vocab-parallel log-prob/entropy, KL and top-k kernels against the fp64 full-vocab reference.

Every case runs on both backends: the chunked torch path and the Triton kernels (under
TRITON_INTERPRET=1 on CPU, set by conftest), with block and chunk sizes small enough that a
row spans several Triton blocks and a shard several torch chunks. TP=2 runs in one torchrun
launch (dist_scripts/kernels_tp.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mopd_megatron.kernels import (
    chunked,
    reference,
    topk_reverse_kl,
    triton_kl,
    vocab_parallel,
    vocab_parallel_kl,
    vocab_parallel_logprob_entropy,
)
from multirank import SCRIPTS, run_torchrun

IMPLS = ["torch", "triton"]
# fp32 logits: outputs and gradients to fp32 accuracy. bf16 logits: outputs still fp32,
# gradients rounded once to bf16 (8 significant bits).
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """Select the backend; shrink its blocks so rows span several of them."""
    monkeypatch.setenv("MOPD_KL_IMPL", request.param)
    monkeypatch.setattr(triton_kl, "BLOCK_V", 32)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 200)
    return request.param


def make_logits(n: int, v: int, seed: int, *, extreme: bool = False) -> torch.Tensor:
    """fp64 logits [n, v] ~ 3·N(0, 1); `extreme` adds ±1e4 entries and -inf columns."""
    z = torch.randn(n, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    if extreme:
        z[0, seed % 5] = 1e4
        z[1, :] -= 1e4
        z[2, seed % 7] = -1e4
        z[:, 3::11] = -torch.inf
    return z


def compare(fn, ref_fn, logits: torch.Tensor, *, rtol: float = 1e-5, cols: slice = slice(None)):
    """Check fn on logits[:, cols] (read in place, strides kept) against ref_fn on the full
    logits in fp64: outputs, and the gradient of a random per-token weighting of them."""
    x = logits[:, cols].detach().requires_grad_()
    x64 = logits.detach().double().requires_grad_()
    out, ref = _tuple(fn(x)), _tuple(ref_fn(x64))
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ref]
    sum((o.double() * w).sum() for o, w in zip(out, weights, strict=True)).backward()
    sum((o * w).sum() for o, w in zip(ref, weights, strict=True)).backward()
    for o, r in zip(out, ref, strict=True):
        assert o.dtype == torch.float32 or logits.dtype == torch.float64
        assert_scaled_close(o, r, 1e-5)
    assert x.grad.dtype == logits.dtype
    assert_scaled_close(x.grad, x64.grad[:, cols], rtol)
    return out, x.grad


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """max |actual − expected| ≤ rtol · max(1, max |expected|) over finite expected values;
    NaNs must match."""
    actual = actual.double()
    assert torch.equal(actual.isnan(), expected.isnan())
    finite = expected.isfinite()
    err = (actual[finite] - expected[finite]).abs().max().item()
    assert err <= rtol * max(1.0, expected[finite].abs().max().item()), err


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_entropy(impl, dtype, temperature):
    z = make_logits(6, 97, seed=1).to(dtype)
    target = torch.tensor([0, 5, 89, 40, 13, 77])

    def run(fn, x):
        return fn(x, target, temperature=temperature, vocab_size=90)

    compare(
        lambda x: run(vocab_parallel_logprob_entropy, x),
        lambda x: run(reference.logprob_entropy, x),
        z,
        rtol=GRAD_RTOL[dtype],
    )


@pytest.mark.parametrize("kind", ["reverse", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl(impl, kind, dtype):
    z, u = make_logits(7, 101, seed=2).to(dtype), make_logits(7, 101, seed=3).to(dtype)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    u[6] = -torch.inf  # garbage in a masked row must not leak

    def run(fn, x, teacher):
        return fn(
            x,
            teacher,
            kind=kind,
            student_temperature=0.8,
            teacher_temperature=1.3,
            loss_mask=mask,
            vocab_size=95,
        )

    out, grad = compare(
        lambda x: run(vocab_parallel_kl, x, u),
        lambda x: run(reference.kl, x, u.double()),
        z,
        rtol=GRAD_RTOL[dtype],
    )
    assert (out[0][~mask] == 0).all() and (grad[~mask] == 0).all()
    assert (grad[:, 95:] == 0).all()


@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_kl_extreme_logits(impl, kind):
    z, u = make_logits(5, 67, seed=4, extreme=True), make_logits(5, 67, seed=5, extreme=True)
    u[3, 0] = -1e4  # student mass where the teacher has almost none
    # A zero-probability event on the weighting side only contributes 0 (finite KL).
    (z if kind == "reverse" else u)[4, 7] = -torch.inf
    compare(
        lambda x: vocab_parallel_kl(x.float(), u.float(), kind=kind),
        lambda x: reference.kl(x, u.float().double(), kind=kind),
        z.float(),
        rtol=1e-5,
    )


@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_kl_identical_is_zero(impl, kind):
    z = make_logits(6, 80, seed=6, extreme=True).float().requires_grad_()
    kl = vocab_parallel_kl(
        z,
        z.detach().clone(),
        kind=kind,
        student_temperature=0.9,
        teacher_temperature=0.9,
        vocab_size=75,
    )
    kl.sum().backward()
    assert kl.abs().max() < 1e-6 and z.grad.abs().max() < 1e-6


def test_logprob_entropy_extreme_logits(impl):
    z = make_logits(5, 67, seed=7, extreme=True).float()
    target = torch.tensor([0, 2, 9, 40, 66])
    compare(
        lambda x: vocab_parallel_logprob_entropy(x, target),
        lambda x: reference.logprob_entropy(x, target),
        z,
    )


def test_topk(impl):
    z = make_logits(5, 70, seed=8)
    lq_all = torch.log_softmax(make_logits(5, 70, seed=9)[:, :66], -1)
    ids = torch.stack(
        [torch.randperm(66, generator=torch.Generator().manual_seed(r))[:6] for r in range(5)]
    )
    ids[1, 4:] = -1  # a teacher that returned fewer than k
    lq = lq_all.gather(1, ids.clamp_min(0)).float()

    def run(fn, x):
        return fn(x, ids, lq, temperature=0.9, vocab_size=66)

    compare(
        lambda x: run(topk_reverse_kl, x.float()),
        lambda x: run(reference.topk_reverse_kl, x),
        z.float(),
    )


def test_topk_over_whole_vocab_is_reverse_kl(impl):
    z, u = make_logits(4, 53, seed=10), make_logits(4, 53, seed=11)
    lq = torch.log_softmax(u[:, :50], -1)
    ids = lq.argsort(1, descending=True)
    lq_k = lq.gather(1, ids).float()
    compare(
        lambda x: topk_reverse_kl(x.float(), ids, lq_k, vocab_size=50),
        lambda x: reference.kl(x, u, vocab_size=50),
        z.float(),
    )


def test_strided_views(impl):
    """A row-slice (row stride > V) is read in place; a column-strided view is copied."""
    big = make_logits(4, 150, seed=12).float()
    target = torch.tensor([1, 2, 3, 4])
    for view in (big[:, :75], big[:, ::2]):
        compare(
            lambda x: vocab_parallel_logprob_entropy(x, target),
            lambda x: reference.logprob_entropy(x, target),
            view,
        )


def test_triton_default_tiling(monkeypatch):
    """Default BLOCK_V: a short row is one power-of-two block per program."""
    monkeypatch.setenv("MOPD_KL_IMPL", "triton")
    z, u = make_logits(3, 67, seed=17).float(), make_logits(3, 67, seed=18).float()
    compare(lambda x: vocab_parallel_kl(x, u, vocab_size=60),
            lambda x: reference.kl(x, u.double(), vocab_size=60), z)  # fmt: skip


@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_gradcheck_fp64(kind, monkeypatch):
    monkeypatch.setenv("MOPD_KL_IMPL", "torch")
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 20)
    z, u = make_logits(3, 11, seed=13).requires_grad_(), make_logits(3, 11, seed=14)
    mask = torch.tensor([True, False, True])
    kw = {
        "student_temperature": 0.7,
        "teacher_temperature": 1.2,
        "loss_mask": mask,
        "vocab_size": 10,
    }
    assert torch.autograd.gradcheck(lambda x: vocab_parallel_kl(x, u, kind=kind, **kw), z)
    target = torch.tensor([0, 9, 4])
    assert torch.autograd.gradcheck(
        lambda x: vocab_parallel_logprob_entropy(x, target, temperature=1.5, vocab_size=10), z
    )
    ids = torch.tensor([[0, 3, -1], [9, 2, 1], [5, -1, -1]])
    lq = torch.log_softmax(u[:, :10], -1).gather(1, ids.clamp_min(0))
    assert torch.autograd.gradcheck(lambda x: topk_reverse_kl(x, ids, lq, vocab_size=10), z)


def test_dispatch(monkeypatch):
    z = make_logits(3, 10, seed=15)
    monkeypatch.setenv("MOPD_KL_IMPL", "auto")
    assert vocab_parallel._backend(vocab_parallel._impl(z)) is chunked
    monkeypatch.setenv("MOPD_KL_IMPL", "reference")
    lp, ent = vocab_parallel_logprob_entropy(z, torch.zeros(3, dtype=torch.long))
    ref_lp, ref_ent = reference.logprob_entropy(z, torch.zeros(3, dtype=torch.long))
    assert torch.equal(lp, ref_lp) and torch.equal(ent, ref_ent)
    monkeypatch.setenv("MOPD_KL_IMPL", "cuda")
    with pytest.raises(ValueError, match="MOPD_KL_IMPL"):
        vocab_parallel_kl(z, z)


def test_bad_arguments():
    z = make_logits(3, 10, seed=16)
    with pytest.raises(ValueError, match="kind"):
        vocab_parallel_kl(z, z, kind="jsd")
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_kl(z, z, vocab_size=11)
    with pytest.raises(ValueError, match="teacher_logits"):
        vocab_parallel_kl(z, z[:, :9])
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprob_entropy(z, torch.zeros(3, dtype=torch.long), temperature=0.0)


def test_tp2_matches_unsharded_reference():
    """Both backends, every quantity, sharded over 2 gloo ranks (one launch)."""
    for rank, results in enumerate(run_torchrun("kernels_tp.py", 2)):
        assert len(results) == 10, results
        assert all(r == "ok" for r in results.values()), (rank, results)


def test_triton_kernels_compile_for_sm90():
    """The real Triton compiler, not the interpreter: every kernel variant to an sm_90 cubin."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "kernels_compile.py")],
        check=False, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("sm_90 cubin ok") == 4, proc.stdout
