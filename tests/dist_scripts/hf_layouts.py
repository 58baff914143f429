"""Run HF <-> Megatron conversion cases at one or more layouts on the ranks of one torchrun launch.

`--plan` is a JSON list of cases, run in order:
- {"kind": "student", "hf": DIR, "layout": {...}, "ref": FILE, "source": DIR, "write": DIR|null}:
  build + load at the layout, compare logits with the reference (HF) logits in FILE, export
  and compare every tensor bit for bit with the safetensors in `source`; optionally write
  the export as an HF folder (rank 0).
- {"kind": "to_megatron", "hf": DIR, "ckpt": DIR, "layout": {...}} and
  {"kind": "to_hf", "ckpt": DIR, "hf": DIR, "layout": {...}}: the file conversions.
- {"kind": "bad_shape", "hf": DIR}: load must fail with HFCheckpointError.
Each rank reports one result dict per case.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multirank import report

from mopd_megatron.config import ModelConfig, ParallelConfig
from mopd_megatron.hf.convert import hf_to_megatron, megatron_to_hf
from mopd_megatron.student.hf_weights import export_hf_weights, unwrap
from mopd_megatron.hf.safetensors_io import (
    HFCheckpointError,
    HFCheckpointReader,
    write_hf_folder,
)
from mopd_megatron.hf.spec import read_hf_config
from mopd_megatron.student.model import build_model, build_student
from mopd_megatron.student.parallel import init_parallel, teardown_parallel


def pipeline_logits(chunks, ids, spec, layout):
    """Forward through all (virtual) pipeline stages by hand; full logits on the last stage."""
    from megatron.core import parallel_state as ps

    pp_group, pp_rank, pp = (
        ps.get_pipeline_model_parallel_group(),
        ps.get_pipeline_model_parallel_rank(),
        layout.pp,
    )
    tp = ps.get_tensor_model_parallel_world_size()
    b, s = ids.shape
    pos = torch.arange(s).expand(b, s)
    seq = s // tp if layout.use_sequence_parallel and tp > 1 else s
    hidden, out = None, None
    for v, chunk in enumerate(chunks):
        for stage in range(pp):
            first = v == 0 and stage == 0
            last = v == len(chunks) - 1 and stage == pp - 1
            if stage != pp_rank:
                continue
            if not first:
                hidden = torch.empty(seq, b, spec.hidden_size)
                dist.recv(hidden, src=dist.get_global_rank(pp_group, (stage - 1) % pp))
            unwrap(chunk).set_input_tensor(hidden)
            with torch.no_grad():
                out = chunk(ids, pos, None)
            if not last:
                dist.send(out.contiguous(), dst=dist.get_global_rank(pp_group, (stage + 1) % pp))
    if not ps.is_pipeline_last_stage():
        return None
    shards = [torch.empty_like(out) for _ in range(tp)]
    dist.all_gather(shards, out.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def run_student(case):
    layout = ParallelConfig(**case["layout"])
    spec = read_hf_config(case["hf"])
    init_parallel(layout, seed=1, spec=spec)
    t0 = time.perf_counter()
    model_cfg = ModelConfig(dtype=case.get("dtype", "float32"))
    chunks, spec = build_student(case["hf"], model_cfg, layout)
    load_s = time.perf_counter() - t0
    ref = torch.load(case["ref"])
    logits = pipeline_logits(chunks, ref["ids"], spec, layout)
    result = {"load_s": load_s}
    if logits is not None:
        result["max_diff"] = (logits[..., : spec.vocab_size] - ref["logits"]).abs().max().item()
        result["padded_vocab"] = logits.shape[-1]
    source = HFCheckpointReader(case["source"])
    t0 = time.perf_counter()
    names, mismatched = [], []
    buckets = export_hf_weights(chunks, spec, bucket_bytes=16 << 10)
    if case.get("write") and dist.get_rank() == 0:
        buckets = _record(buckets, names, mismatched, source)
        write_hf_folder(buckets, case["write"], case["source"], max_shard_bytes=200 << 10)
    else:
        for _ in _record(buckets, names, mismatched, source):
            pass
    result.update(
        export_s=time.perf_counter() - t0,
        exported=sorted(names),
        mismatched=mismatched,
        expected=sorted(source.files),
    )
    dist.barrier()
    return result


def _record(buckets, names, mismatched, source):
    for bucket in buckets:
        for name, tensor in bucket:
            names.append(name)
            if not torch.equal(tensor, source.get(name).to(tensor.dtype)):
                mismatched.append(name)
        yield bucket


def run_case(case):
    kind = case["kind"]
    if kind == "student":
        return run_student(case)
    layout = ParallelConfig(**case.get("layout", {}))
    t0 = time.perf_counter()
    if kind == "to_megatron":
        hf_to_megatron(case["hf"], case["ckpt"], layout)
    elif kind == "to_hf":
        megatron_to_hf(case["ckpt"], case["hf"], layout, max_shard_bytes=200 << 10)
    elif kind == "patches":
        from mopd_megatron.student.cpu_compat import apply_cpu_patches

        applied = [apply_cpu_patches(), apply_cpu_patches()]
        return {
            "applied": applied,
            "modes": len(torch.overrides._get_current_function_mode_stack()),
        }
    elif kind == "recompute":
        spec = read_hf_config(case["hf"])
        init_parallel(layout, seed=1, spec=spec)
        model_cfg = ModelConfig(recompute_activations=True)
        (chunk,), _ = build_student(case["hf"], model_cfg, layout)
        ids = torch.randint(0, spec.vocab_size, (2, 8))
        chunk(ids, torch.arange(8).expand(2, 8), None).float().square().mean().backward()
        grads = [p.grad for p in chunk.parameters() if p.grad is not None]
        return {
            "params": len(list(chunk.parameters())),
            "grads": len(grads),
            "finite": all(bool(g.isfinite().all()) for g in grads),
        }
    elif kind == "bad_shape":
        spec = read_hf_config(case["hf"])
        init_parallel(layout, seed=1, spec=spec)
        chunks = build_model(spec, ModelConfig(), layout)
        from mopd_megatron.student.hf_weights import load_hf_weights

        try:
            load_hf_weights(chunks, case["hf"], spec)
        except HFCheckpointError as err:
            return {"error": str(err)}
        return {"error": None}
    return {"seconds": time.perf_counter() - t0}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--plan", required=True)
    args = parser.parse_args()
    results = [run_case(case) for case in json.loads(args.plan)]
    report(args.out, dist.get_rank(), {"results": results})
    teardown_parallel()


if __name__ == "__main__":
    main()
