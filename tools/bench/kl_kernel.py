"""Benchmark: per-token vocab-parallel losses, forward + backward, methods side by side.

Methods, run in one process on the same inputs:
    naive    torch over the whole shard: log_softmax of student (and teacher), autograd
    chunked  mopd_megatron.kernels with MOPD_KL_IMPL=torch (the CPU training path)
    triton   mopd_megatron.kernels with MOPD_KL_IMPL=triton (CUDA only)
    liger    Liger-Kernel's LigerJSD(beta=1) (= reverse KL) on torch log-softmaxes
             (reverse KL on CUDA only, when liger_kernel imports)

TP=2 is simulated on one device: every method runs on one rank's [N, V/2] shard without
collectives (those move [N]-sized vectors only). Time: median of --reps forward+backward runs
after one warm-up, as wall-clock and, on CPU, as CPU time of the calling thread (with
--threads 1 that is all the work, and it is less disturbed by other processes on a shared
machine than wall-clock). Memory, in a second pass after all timings: peak allocation beyond
the inputs during one run, gradient included (torch.cuda.max_memory_allocated on GPU; on CPU
the growth of the resident set size, sampled every ~0.2 ms and at the end, after
malloc_trim(0) has returned free heap pages, so only memory the run touches counts; an
approximation). On GPU, "floor" is the 6 B/element time (read bf16 z and u, write bf16 dz)
at the copy bandwidth measured in the same run.

    python tools/bench/kl_kernel.py                     # GPU shapes on CUDA, small ones on CPU
    python tools/bench/kl_kernel.py --loss logprob_entropy --shapes 1024x32000 --tp 1
Prints a markdown table and writes tools/bench/kl_kernel_<loss>.png.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from mopd_megatron.kernels import vocab_parallel_kl, vocab_parallel_logprob_entropy

CUDA = torch.cuda.is_available()
GPU_SHAPES = ["4096x32000", "4096x151936", "16384x32000", "16384x151936"]
CPU_SHAPES = ["512x8192", "512x32000", "2048x8192", "2048x32000"]


def naive(loss: str, u: torch.Tensor, target: torch.Tensor):
    def run(z):
        lp = torch.log_softmax(z.float(), -1)
        if loss == "logprob_entropy":
            return lp.gather(1, target[:, None])[:, 0], -(lp.exp() * lp).sum(-1)
        lq = torch.log_softmax(u.float(), -1)
        return (lp.exp() * (lp - lq)).sum(-1) if loss == "rkl" else (lq.exp() * (lq - lp)).sum(-1)

    return run


def ours(impl: str, loss: str, u: torch.Tensor, target: torch.Tensor):
    def run(z):
        os.environ["MOPD_KL_IMPL"] = impl
        if loss == "logprob_entropy":
            return vocab_parallel_logprob_entropy(z, target)
        return vocab_parallel_kl(z, u, kind="reverse" if loss == "rkl" else "forward")

    return run


def liger(u: torch.Tensor):
    from liger_kernel.transformers import LigerJSD

    jsd, log_q = LigerJSD(beta=1.0), torch.log_softmax(u.float(), -1)
    return lambda z: jsd(torch.log_softmax(z.float(), -1), log_q)


def methods(loss: str, u: torch.Tensor, target: torch.Tensor) -> dict:
    found = {"naive": naive(loss, u, target), "chunked": ours("torch", loss, u, target)}
    if CUDA:
        found["triton"] = ours("triton", loss, u, target)
        if loss == "rkl":
            try:
                found["liger"] = liger(u)
            except (ImportError, TypeError) as err:  # not installed, or another API version
                print(f"liger skipped: {err}")
    return found


def run_once(fn, z: torch.Tensor) -> torch.Tensor:
    """Forward + backward of fn(z) with per-token weights on the outputs; returns the leaf."""
    weights = torch.linspace(0.5, 1.5, z.shape[0], device=z.device)
    x = z.detach().requires_grad_()
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum((o * weights).sum() if o.dim() else o for o in outs).backward()
    _sync()
    return x


def measure_time(fns: dict, z: torch.Tensor, reps: int) -> dict[str, tuple[float, float]]:
    """{name: (median wall ms, median calling-thread CPU ms)} after one warm-up round.

    Methods take turns within each round, so load from other processes hits them alike.
    """
    times = {name: [] for name in fns}
    for rep in range(reps + 1):
        for name, fn in fns.items():
            _sync()
            start, cpu_start = time.perf_counter(), time.thread_time()
            run_once(fn, z)
            if rep:
                times[name].append((time.perf_counter() - start, time.thread_time() - cpu_start))
    med = statistics.median
    return {
        name: tuple(med(col) * 1e3 for col in zip(*t, strict=True)) for name, t in times.items()
    }


def measure_memory(fns: dict, z: torch.Tensor) -> dict[str, float]:
    """{name: peak MiB allocated beyond the inputs during one fwd + bwd}."""
    peaks = {}
    for name, fn in fns.items():
        with _PeakMemory() as mem:
            x = run_once(fn, z)  # its gradient is still held when the block exits
        del x
        peaks[name] = mem.peak / 2**20
    return peaks


class _PeakMemory:
    """Peak bytes allocated inside the block beyond what was allocated at its start."""

    def __enter__(self):
        _sync()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.proc, self.done = psutil.Process(), False
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # free pages leave the RSS until touched
            self.base = self.top = self.proc.memory_info().rss
            self.switch = sys.getswitchinterval()
            sys.setswitchinterval(1e-5)  # let the sampler in between torch ops
            self.thread = threading.Thread(target=self._sample)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.top = max(self.top, self.proc.memory_info().rss)
            time.sleep(2e-4)

    def __exit__(self, *exc):
        if CUDA:
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.done = True
            self.thread.join()
            sys.setswitchinterval(self.switch)
            self.peak = max(self.top, self.proc.memory_info().rss) - self.base


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (reads + writes)."""
    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync()
    start = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    _sync()
    return 2 * src.numel() * 20 / (time.perf_counter() - start)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def case_inputs(n: int, vocab: int, tp: int, loss: str, device: str, dtype: torch.dtype):
    """(methods, student shard z) for one rank's [n, vocab/tp] shard, seeded."""
    gen = torch.Generator(device=device).manual_seed(0)
    z, u = (
        torch.randn(n, vocab // tp, generator=gen, device=device).mul_(3).to(dtype)
        for _ in range(2)
    )
    target = torch.randint(0, vocab // tp, (n,), generator=gen, device=device)
    return methods(loss, u, target), z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", choices=["rkl", "fkl", "logprob_entropy"], default="rkl")
    parser.add_argument("--shapes", nargs="+", default=GPU_SHAPES if CUDA else CPU_SHAPES)
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=5 if CUDA else 2)
    parser.add_argument("--dtype", default="bfloat16" if CUDA else "float32")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = ("cuda" if CUDA else "cpu"), getattr(torch, args.dtype)
    bandwidth = copy_bandwidth() if CUDA else None
    print(
        f"device: {torch.cuda.get_device_name() if CUDA else 'CPU'}, dtype {args.dtype}, "
        f"loss {args.loss}, torch threads {torch.get_num_threads()}"
    )
    cases = [(*map(int, shape.split("x")), tp) for shape in args.shapes for tp in args.tp]
    times = {
        case: measure_time(*case_inputs(*case, args.loss, device, dtype), args.reps)
        for case in cases
    }
    rows = []
    for n, vocab, tp in cases:
        fns, z = case_inputs(n, vocab, tp, args.loss, device, dtype)
        peaks = measure_memory(fns, z)
        naive = (*times[n, vocab, tp]["naive"], peaks["naive"])
        floor_ms = 6 * z.numel() / bandwidth * 1e3 if bandwidth else None
        for name, (ms, cpu_ms) in times[n, vocab, tp].items():
            row = {"n": n, "vocab": vocab, "tp": tp, "method": name, "ms": ms, "cpu_ms": cpu_ms}
            rows.append(row | {"mib": peaks[name], "naive": naive, "floor_ms": floor_ms})
    print_table(rows)
    plot(rows, args.out / f"kl_kernel_{args.loss}.png", args.loss)


def print_table(rows: list[dict]) -> None:
    print(
        "| N | V | TP | method | wall ms | × naive | thread-CPU ms | × naive | peak MiB "
        "| × naive | × 6 B floor |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        cells = [r["n"], r["vocab"], r["tp"], r["method"]]
        for value, base in zip((r["ms"], r["cpu_ms"], r["mib"]), r["naive"], strict=True):
            cells += [f"{value:.1f}" if value < 100 else f"{value:.0f}", f"{value / base:.2f}"]
        cells.append(f"{r['ms'] / r['floor_ms']:.2f}" if r["floor_ms"] else "n/a")
        print("| " + " | ".join(map(str, cells)) + " |")


def plot(rows: list[dict], path: Path, loss: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["n"], r["vocab"], r["tp"]) for r in rows))
    names = list(dict.fromkeys(r["method"] for r in rows))
    time_key = "ms" if CUDA else "cpu_ms"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        mine = {(r["n"], r["vocab"], r["tp"]): r for r in rows if r["method"] == name}
        xs = [j + i * width for j in range(len(cases))]
        for ax, key in zip(axes, (time_key, "mib"), strict=True):
            ax.bar(xs, [mine[c][key] if c in mine else 0 for c in cases], width, label=name)
    titles = ("wall ms" if CUDA else "thread-CPU ms", "peak extra memory (MiB)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))],
                      [f"{n}x{v}\nTP{tp}" for n, v, tp in cases], fontsize=8)  # fmt: skip
        ax.set_title(f"{title} per forward+backward")
        ax.set_yscale("log")
        ax.legend()
    device = torch.cuda.get_device_name() if CUDA else "CPU"
    fig.suptitle(f"{loss}: naive torch vs mopd_megatron.kernels ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
