"""The MOPD top-k loss on fixed multi-turn trajectories at several layouts (2 ranks).

The trajectories (`train_common.multi_turn_trajectories`) interleave prompt, sampled
turns and observations, so the loss mask has holes. For each layout (DP2, TP2+SP with a
ragged micro-batch split, EP2): two train_steps with the `topk` objective; rank 0 reports
the step metrics and the exported weights.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist
import train_common as tc
from multirank import report

LAYOUTS = {"dp2": ({}, 2), "tp2": ({"tp": 2}, 3), "ep2": ({"ep": 2}, 1)}
"""name: (ParallelConfig fields, micro_batch_size) on 2 ranks; 8 sequences."""


def run_layout(hf_dir: str, name: str) -> dict:
    from megatron.core import parallel_state

    from mopd_megatron.config import AlgorithmConfig
    from mopd_megatron.mopd.batch import build_batch
    from mopd_megatron.mopd.objectives import LossContext, build_objective
    from mopd_megatron.student.parallel import teardown_parallel
    from mopd_megatron.student.train_step import slice_for_data_parallel, train_step

    fields, micro_batch_size = LAYOUTS[name]
    chunks, optimizer, scheduler, spec = tc.build(hf_dir, fields, lr=1e-3)
    batch = build_batch(tc.multi_turn_trajectories(tc.VOCAB), pad_id=0, domains=["echo"], topk=4)
    tp_group = parallel_state.get_tensor_model_parallel_group() if fields.get("tp") else None
    objective = build_objective(AlgorithmConfig(loss="topk", topk=4, orm_coef=0.5),
                                LossContext(vocab_size=spec.vocab_size, tp_group=tp_group))
    steps = [train_step(chunks, optimizer, scheduler, slice_for_data_parallel(batch), objective,
                        micro_batch_size) for _ in range(2)]
    weights = tc.exported_weights(chunks, spec)
    teardown_parallel()
    return {"steps": [{k: float(v) for k, v in s.items()} for s in steps],
            "weights": weights.tolist() if dist.get_rank() == 0 else None}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    report(args.out, dist.get_rank(), {name: run_layout(args.hf, name) for name in LAYOUTS})


if __name__ == "__main__":
    main()
