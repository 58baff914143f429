"""Save / resume the tiny MoE student at TP2+SP (two launches), and reload it at another layout.

--phase train: 4 steps on toy batches 1..4, saving after steps 1, 2 and 3 (keep_last=2);
    reports every step's metrics and the log-probs of batch 0 after step 2.
--phase resume: a fresh process loads the step-2 checkpoint (model, optimizer, scheduler,
    RNG, extra) and runs steps 3 and 4 (their metrics must equal the first run's bit for bit);
    then, at each --reshard layout, loads the step-2 model, optimizer and scheduler (Megatron
    reshards them; the RNG states stay), reports the log-probs and runs steps 3 and 4 again.
"""

import argparse
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import train_common as tc
from multirank import report

LAYOUT = "tp2"


def probe(chunks, spec) -> list:
    return tc.forward_rows(chunks, spec, tc.toy_batch(0))[0]


def step(state, number: int, layout: str = LAYOUT) -> dict:
    chunks, optimizer, scheduler, spec = state
    metrics = tc.timed_step(chunks, optimizer, scheduler, tc.toy_batch(number), spec,
                            tc.LAYOUTS[layout][1])
    metrics["rng"] = [random.random(), float(torch.rand(1))]  # RNG streams continue exactly
    return metrics


def train(args) -> dict:
    from mopd_megatron.student.checkpoint import save_checkpoint

    state = tc.build(args.hf, tc.LAYOUTS[LAYOUT][0])
    out = {"steps": {}}
    for number in range(1, 5):
        out["steps"][number] = step(state, number)
        if number == 2:
            out["probe"] = probe(state[0], state[3])
        if number <= 3:
            extra = {"step": number, "sampler": {"epoch": 0, "position": 8 * number}}
            save_checkpoint(args.ckpt, number, *state[:3], extra=extra, keep_last=2)
    out["listing"] = sorted(os.listdir(args.ckpt))
    return out


def resume(args) -> dict:
    from mopd_megatron.student.checkpoint import load_checkpoint
    from mopd_megatron.student.parallel import teardown_parallel

    state = tc.build(args.hf, tc.LAYOUTS[LAYOUT][0])
    out = {"extra": load_checkpoint(args.ckpt, *state[:3], step=2), "steps": {}}
    for number in (3, 4):
        out["steps"][number] = step(state, number)
    teardown_parallel()
    out["reshard"] = {}
    for layout in args.reshard.split(","):
        state = tc.build(args.hf, tc.LAYOUTS[layout][0])
        load_checkpoint(args.ckpt, *state[:3], step=2)
        out["reshard"][layout] = {"probe": probe(state[0], state[3]),
                                  "steps": {n: step(state, n, layout) for n in (3, 4)}}
        teardown_parallel()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--phase", choices=["train", "resume"], required=True)
    parser.add_argument("--reshard", default="ep2,pp2", help="comma-separated layouts")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    result = train(args) if args.phase == "train" else resume(args)
    report(args.out, dist.get_rank(), result)


if __name__ == "__main__":
    main()
