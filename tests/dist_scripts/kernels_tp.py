"""TP=2 over gloo: sharded kernel outputs and shard gradients vs the unsharded reference.

Run by tests/test_kernels.py through multirank.run_torchrun; reports {case: "ok" or the
failure} per rank, for the chunked torch backend and the Triton backend (interpreter on CPU),
with test_kernels.compare's tolerances.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels module is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist
from mopd_megatron.kernels import (
    chunked,
    reference,
    topk_reverse_kl,
    triton_kl,
    vocab_parallel_kl,
    vocab_parallel_logprob_entropy,
)
from multirank import report
from test_kernels import compare, make_logits

N, V_LOCAL = 6, 67


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, group = dist.get_rank(), dist.group.WORLD
    triton_kl.BLOCK_V, chunked.CHUNK_ELEMENTS = 32, 200
    cols = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    z, u = make_logits(N, 2 * V_LOCAL, seed=20), make_logits(N, 2 * V_LOCAL, seed=21)
    z[0, V_LOCAL + 3], u[3, 2] = 1e4, -torch.inf  # row 3 is masked for the KL
    target = torch.tensor([0, 66, 67, 120, 5, 124])
    ids = torch.tensor([[0, 70, 3, -1], [66, 67, 1, 2], [120, -1, -1, -1]]).repeat(2, 1)
    log_q = torch.log_softmax(u[:, :125], -1).gather(1, ids.clamp_min(0))
    mask = torch.tensor([1, 1, 1, 0, 1, 1], dtype=torch.bool)
    kl_kw = {"student_temperature": 0.8, "teacher_temperature": 1.2, "vocab_size": 125}
    cases = {
        "logprob_entropy": (
            lambda x, **tp: vocab_parallel_logprob_entropy(
                x, target, temperature=0.7, vocab_size=125, **tp
            ),
            lambda x: reference.logprob_entropy(x, target, temperature=0.7, vocab_size=125),
        ),
        # rank 1 owns no real column at all
        "logprob_entropy_padded_rank": (
            lambda x, **tp: vocab_parallel_logprob_entropy(x, target % 60, vocab_size=60, **tp),
            lambda x: reference.logprob_entropy(x, target % 60, vocab_size=60),
        ),
        "topk": (
            lambda x, **tp: topk_reverse_kl(x, ids, log_q.float(), vocab_size=125, **tp),
            lambda x: reference.topk_reverse_kl(x, ids, log_q, vocab_size=125),
        ),
    }
    for kind in ("reverse", "forward"):
        cases[f"kl_{kind}"] = (
            lambda x, kind=kind, **tp: vocab_parallel_kl(
                x, u[:, cols].float(), kind=kind, loss_mask=mask, **kl_kw, **tp
            ),
            lambda x, kind=kind: reference.kl(x, u, kind=kind, loss_mask=mask, **kl_kw),
        )
    results = {}
    for impl in ("torch", "triton"):
        os.environ["MOPD_KL_IMPL"] = impl
        for name, (fn, ref_fn) in cases.items():
            # compare() asserts only after the case's collectives, so a failure cannot hang
            # the other rank; it is reported instead.
            try:
                compare(lambda x, fn=fn: fn(x, tp_group=group), ref_fn, z.float(), cols=cols)
                results[f"{impl}/{name}"] = "ok"
            except AssertionError as err:
                results[f"{impl}/{name}"] = f"failed: {err!r}"
    report(args.out, rank, results)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
