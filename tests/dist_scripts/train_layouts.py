"""Two training steps of the tiny MoE student at several layouts in one torchrun launch.

For each layout (names from `train_common.LAYOUTS`, run in turn in the same process group):
forward_logprobs before training, two train_steps on the toy batch, then the exported HF
weights. Rank 0 reports everything as lists; every rank's weights are compared with rank 0's
copy (`replica_max_diff`), which catches replicas that drift apart (e.g. expert copies).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist
import train_common as tc
from multirank import report


def run_layout(hf_dir: str, name: str) -> dict:
    from mopd_megatron.student.parallel import teardown_parallel

    fields, micro_batch_size = tc.LAYOUTS[name]
    chunks, optimizer, scheduler, spec = tc.build(hf_dir, fields, lr=1e-3)
    batch = tc.toy_batch()
    logprob, entropy = tc.forward_rows(chunks, spec, batch)
    steps = [tc.timed_step(chunks, optimizer, scheduler, batch, spec, micro_batch_size)
             for _ in range(2)]
    weights = tc.exported_weights(chunks, spec)
    result = {
        "steps": steps,
        "logprob": logprob,
        "entropy": entropy,
        "replica_max_diff": tc.replica_max_diff(weights),
        "weights": weights.tolist() if dist.get_rank() == 0 else None,
    }
    teardown_parallel()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--layouts", required=True, help="comma-separated names")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # kept across layouts (teardown_parallel leaves it)
    results = {name: run_layout(args.hf, name) for name in args.layouts.split(",")}
    report(args.out, dist.get_rank(), results)


if __name__ == "__main__":
    main()
