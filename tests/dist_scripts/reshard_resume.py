"""Save the tiny MoE student at one layout and resume it at others, with another world size.

--phase save (2 ranks, TP2 x EP2 with SP, dp 1): Adam steps on toy batches 1 and 2, a
    checkpoint of step 2, the log-probs of batch 0, then step 3 (the reference).
--phase resume (any ranks): for each --layouts entry, a fresh model, optimizer and scheduler at
    that layout load the step-2 checkpoint (Megatron reshards model and optimizer state); the
    log-probs of batch 0 and step 3 must match the reference.
Every rank also reports its pipeline stage and parameter counts, for the planner's test.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist
import train_common as tc
from multirank import report

LAYOUTS = {
    # name: (ParallelConfig fields, micro_batch_size)
    "tp2ep2": ({"tp": 2, "ep": 2}, 2),
    "pp2": ({"pp": 2}, 1),
    "ep4": ({"ep": 4}, 2),
}


def rank_report(chunks) -> dict:
    from megatron.core import parallel_state

    from mopd_megatron.plan.meta import count_params
    from mopd_megatron.student.model import unwrap

    dense, expert = count_params([unwrap(chunk) for chunk in chunks])
    stage = parallel_state.get_pipeline_model_parallel_rank()
    return {"stage": stage, "dense": dense, "expert": expert}


def save(args) -> dict:
    from mopd_megatron.student.checkpoint import save_checkpoint

    fields, mbs = LAYOUTS["tp2ep2"]
    chunks, optimizer, scheduler, spec = tc.build(args.hf, fields)
    for number in (1, 2):
        tc.timed_step(chunks, optimizer, scheduler, tc.toy_batch(number), spec, mbs)
    save_checkpoint(args.ckpt, 2, chunks, optimizer, scheduler, extra={"step": 2})
    probe = tc.forward_rows(chunks, spec, tc.toy_batch(0))[0]
    step3 = tc.timed_step(chunks, optimizer, scheduler, tc.toy_batch(3), spec, mbs)
    return {"probe": probe, "step3": step3, "params": rank_report(chunks)}


def resume(args) -> dict:
    from mopd_megatron.student.checkpoint import load_checkpoint
    from mopd_megatron.student.parallel import teardown_parallel

    out = {}
    for layout in args.layouts.split(","):
        fields, mbs = LAYOUTS[layout]
        chunks, optimizer, scheduler, spec = tc.build(args.hf, fields)
        extra = load_checkpoint(args.ckpt, chunks, optimizer, scheduler, step=2)
        out[layout] = {
            "extra": extra,
            "probe": tc.forward_rows(chunks, spec, tc.toy_batch(0))[0],
            "step3": tc.timed_step(chunks, optimizer, scheduler, tc.toy_batch(3), spec, mbs),
            "params": rank_report(chunks),
        }
        teardown_parallel()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--phase", choices=["save", "resume"], required=True)
    parser.add_argument("--layouts", default="pp2,ep4")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    result = save(args) if args.phase == "save" else resume(args)
    report(args.out, dist.get_rank(), result)


if __name__ == "__main__":
    main()
