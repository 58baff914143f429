"""Compile the Triton KL kernels ahead of time for an H100 (sm_90), no GPU needed.

The interpreter accepts code that the real compiler rejects (non-constexpr globals, dtype
mismatches in tl.where, ...); this lowers every kernel variant to a cubin with the ptxas that
ships with Triton. Run by tests/test_kernels.py in a subprocess without TRITON_INTERPRET.
Prints one line per kernel variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import triton
from mopd_megatron.kernels import triton_kl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

STATS_SIG = {
    "z_ptr": "*bf16", "u_ptr": "*bf16", "out_ptr": "*fp32", "z_stride": "i64", "u_stride": "i64",
    "n_valid": "i32", "inv_tau_z": "fp32", "inv_tau_u": "fp32",
}  # fmt: skip
GRAD_SIG = {
    "z_ptr": "*bf16", "u_ptr": "*bf16", "coef_ptr": "*fp32", "grad_ptr": "*bf16",
    "z_stride": "i64", "u_stride": "i64", "grad_stride": "i64", "n_valid": "i32",
    "n_cols": "i32", "inv_tau_z": "fp32", "inv_tau_u": "fp32",
}  # fmt: skip


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    for kernel, signature in ((triton_kl._stats_kernel, STATS_SIG),
                              (triton_kl._grad_kernel, GRAD_SIG)):  # fmt: skip
        for teacher in (True, False):
            constexprs = {"HAS_TEACHER": teacher, "BLOCK": triton_kl.BLOCK_V}
            sig = {**signature, **dict.fromkeys(constexprs, "constexpr")}
            compiled = triton.compile(
                ASTSource(kernel, sig, constexprs=constexprs),
                target=target,
                options={"num_warps": triton_kl.NUM_WARPS},
            )
            assert compiled.asm["cubin"], kernel.__name__
            print(f"{kernel.__name__} HAS_TEACHER={teacher}: sm_90 cubin ok")


if __name__ == "__main__":
    main()
