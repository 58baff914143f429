"""Parameter-merging baselines: teacher HF folders (+ the student) -> one merged HF folder.

Two merges, computed tensor by tensor in fp32 and written in the student's dtype:

- average:          θ = (1/D) Σ_d θ_d
- task arithmetic:  θ = θ_s + Σ_d λ_d (θ_d − θ_s)   (θ_s the student the teachers came from)

The average is task arithmetic with λ_d = 1/D. Inputs are HF safetensors folders or Megatron
distributed checkpoints (converted to HF first, in this process). Every folder must hold the
same tensor names and shapes; the output copies the student's (or first teacher's) config and
tokenizer. Tensors are streamed: one name at a time is held from each input, so the merge of
a 30B model needs the memory of its largest tensor times (D + 2), not of the model.

Command line:
    python -m experiments.merge --out DIR --teachers T1 T2 ... \
        [--student S] [--method average|task_arithmetic] [--lambdas 0.5 0.5 ...]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from mopd_megatron.cli import run_reporting_errors
from mopd_megatron.hf.safetensors_io import (
    HFCheckpointError,
    HFCheckpointReader,
    write_hf_folder,
)

BUCKET_TENSORS = 64
"""Merged tensors handed to the writer at a time."""


def merge_weights(
    teachers: Sequence[torch.Tensor], lambdas: Sequence[float], student: torch.Tensor | None
) -> torch.Tensor:
    """θ_s + Σ λ_d (θ_d − θ_s) in fp32 (Σ λ_d θ_d without a student), in the inputs' dtype.

    Args:
        teachers: one tensor per teacher, same shape.
        lambdas: one weight per teacher.
        student: the student's tensor, or None for a plain weighted sum of the teachers.

    Returns:
        The merged tensor, in the student's (else the first teacher's) dtype.
    """
    reference = teachers[0] if student is None else student
    merged = torch.zeros_like(reference, dtype=torch.float32)
    if student is not None:
        merged += student.float()
    for lam, tensor in zip(lambdas, teachers, strict=True):
        delta = tensor.float() - (student.float() if student is not None else 0.0)
        merged += lam * delta
    return merged.to(reference.dtype)


def _merged_buckets(
    readers: list[HFCheckpointReader], lambdas: Sequence[float], student: HFCheckpointReader | None
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    names = sorted((student or readers[0]).files)
    for reader in [*readers, *([student] if student else [])]:
        if set(reader.files) != set(names):
            odd = sorted(set(reader.files) ^ set(names))[:3]
            raise HFCheckpointError(
                f"{reader.dir}: tensor names differ from the others, e.g. {odd}"
            )
    bucket: list[tuple[str, torch.Tensor]] = []
    for name in names:
        tensors = [r.get(name) for r in readers]
        base = student.get(name) if student else None
        shapes = {tuple(t.shape) for t in [*tensors, *([base] if base is not None else [])]}
        if len(shapes) > 1:
            raise HFCheckpointError(f"tensor {name!r} has different shapes: {sorted(shapes)}")
        if not tensors[0].is_floating_point():
            bucket.append((name, tensors[0]))
        else:
            bucket.append((name, merge_weights(tensors, lambdas, base)))
        if len(bucket) == BUCKET_TENSORS:
            yield bucket
            bucket = []
    if bucket:
        yield bucket


def merge_folders(
    out_dir: str | Path,
    teachers: Sequence[str | Path],
    *,
    student: str | Path | None = None,
    lambdas: Sequence[float] | None = None,
) -> Path:
    """Merge HF folders into `out_dir` (see the module docstring).

    Args:
        out_dir: the merged HF folder (created).
        teachers: the teachers' HF folders.
        student: the student's HF folder (task arithmetic); None = weighted teacher sum.
        lambdas: one weight per teacher; default 1/D each (with no student: the average).

    Returns:
        `out_dir`.
    """
    lambdas = list(lambdas) if lambdas is not None else [1.0 / len(teachers)] * len(teachers)
    if len(lambdas) != len(teachers):
        raise ValueError(f"{len(teachers)} teachers but {len(lambdas)} lambdas")
    readers = [HFCheckpointReader(t) for t in teachers]
    base = HFCheckpointReader(student) if student is not None else None
    template = student if student is not None else teachers[0]
    return write_hf_folder(_merged_buckets(readers, lambdas, base), out_dir, template)


def average(out_dir: str | Path, teachers: Sequence[str | Path]) -> Path:
    """Param-Merge (Avg.): the mean of the teachers' weights."""
    return merge_folders(out_dir, teachers)


def task_arithmetic(
    out_dir: str | Path,
    student: str | Path,
    teachers: Sequence[str | Path],
    lambdas: float | Sequence[float],
) -> Path:
    """Param-Merge (Task Arithmetic): θ_s + Σ λ_d (θ_d − θ_s); one λ or one per teacher."""
    if isinstance(lambdas, (int, float)):
        lambdas = [float(lambdas)] * len(teachers)
    return merge_folders(out_dir, teachers, student=student, lambdas=lambdas)


def as_hf_folder(path: str | Path, work_dir: str | Path, hf_config: str | Path | None) -> Path:
    """`path` itself when it is an HF folder; a Megatron distributed checkpoint is converted.

    Args:
        path: an HF folder or a Megatron checkpoint (a folder with metadata.json).
        work_dir: where converted folders go.
        hf_config: HF config + tokenizer folder for checkpoints without `hf_config/`.
    """
    path = Path(path)
    if not (path / "metadata.json").is_file():
        return path
    from mopd_megatron.hf.convert import megatron_to_hf
    from mopd_megatron.student.parallel import teardown_parallel

    out = Path(tempfile.mkdtemp(prefix=f"{path.name}-", dir=work_dir))
    megatron_to_hf(path, out, hf_config_dir=hf_config)
    teardown_parallel()
    return out


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """Merge from the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Merge teacher checkpoints into one HF folder."
    )
    parser.add_argument("--out", required=True, help="merged HF folder")
    parser.add_argument("--teachers", nargs="+", required=True, help="HF or Megatron folders")
    parser.add_argument("--student", help="the common start (required by task arithmetic)")
    parser.add_argument("--method", choices=["average", "task_arithmetic"], default="average")
    parser.add_argument("--lambdas", nargs="+", type=float, help="one λ, or one per teacher")
    parser.add_argument("--hf-config", help="HF config/tokenizer folder for Megatron inputs")
    args = parser.parse_args(argv)
    work = Path(args.out).parent
    work.mkdir(parents=True, exist_ok=True)
    teachers = [as_hf_folder(t, work, args.hf_config) for t in args.teachers]
    if args.method == "average":
        average(args.out, teachers)
        return
    if not args.student or not args.lambdas:
        parser.error("task_arithmetic needs --student and --lambdas")
    student = as_hf_folder(args.student, work, args.hf_config)
    lambdas = args.lambdas[0] if len(args.lambdas) == 1 else args.lambdas
    task_arithmetic(args.out, student, teachers, lambdas)


if __name__ == "__main__":
    raise SystemExit(run_reporting_errors("python -m experiments.merge", main))
