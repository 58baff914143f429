"""Routing replay at several layouts in one torchrun launch (tiny MoE student, 4 ranks).

For each layout of `train_common.LAYOUTS` (pp2 with full activation recompute, so the
backward replays through `REPLAY_BACKWARD`): the student is built with replay, then
forward_logprobs with the engine's routes and without them, and one train_step with them.
The engine's routes come from the pytest side (`--routes`, a torch file of the toy batch's
`routed_experts`). Rank 0 reports everything as lists.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import train_common as tc
from multirank import report


def build(hf_dir: str, fields: dict, recompute: bool):
    from mopd_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
    from mopd_megatron.hf.spec import read_hf_config
    from mopd_megatron.student.model import build_student
    from mopd_megatron.student.optimizer import setup_optimizer
    from mopd_megatron.student.parallel import init_parallel
    from mopd_megatron.student.routing_replay import RouteReplayer

    parallel, spec = ParallelConfig(**fields), read_hf_config(hf_dir)
    init_parallel(parallel, seed=1234, spec=spec)
    model = ModelConfig(hf_path=hf_dir, recompute_activations=recompute)
    chunks, _ = build_student(hf_dir, model, parallel, spec, moe_enable_routing_replay=True)
    chunks, optimizer, scheduler = setup_optimizer(chunks, OptimizerConfig(lr=1e-3), 10)
    return chunks, optimizer, scheduler, spec, RouteReplayer(chunks, spec.num_layers)


def forward_rows(chunks, spec, batch, replay) -> list:
    from megatron.core import parallel_state

    from mopd_megatron.student.forward import forward_logprobs
    from mopd_megatron.student.train_step import slice_for_data_parallel

    logprob, _ = forward_logprobs(chunks, slice_for_data_parallel(batch), 2,
                                  vocab_size=spec.vocab_size, replay=replay)
    group = parallel_state.get_data_parallel_group()
    shares = [None] * dist.get_world_size(group)
    dist.all_gather_object(shares, logprob.tolist(), group=group)
    return [row for share in shares for row in share]


def teacher_check(hf_dir: str, fields: dict, batch: dict) -> dict:
    """A local teacher built beside the replaying student: does it replay, and its log-probs
    (while the student's routers are still set to replay)."""
    from mopd_megatron.config import ModelConfig, ParallelConfig
    from mopd_megatron.student.forward import next_token_targets
    from mopd_megatron.student.local_teacher import LocalTeachers
    from mopd_megatron.student.routing_replay import _routers

    teachers = LocalTeachers({0: hf_dir}, ModelConfig(hf_path=hf_dir), ParallelConfig(**fields))
    (model,) = teachers.models.values()
    logits = teachers.logits(batch["tokens"], torch.zeros(len(batch["tokens"]), dtype=torch.long))
    logp = torch.log_softmax(logits[..., : 42].float(), -1)
    logprob = logp.gather(-1, next_token_targets(batch["tokens"])[..., None])[..., 0]
    return {"teacher_replays": any(r.router_replay is not None for r in _routers(model)),
            "teacher": logprob.tolist()}


def run_layout(hf_dir: str, name: str, routes: torch.Tensor) -> dict:
    from mopd_megatron.student.parallel import teardown_parallel
    from mopd_megatron.student.train_step import slice_for_data_parallel, train_step

    fields, micro_batch_size = tc.LAYOUTS[name]
    chunks, optimizer, scheduler, spec, replay = build(hf_dir, fields, recompute=name == "pp2")
    plain = tc.toy_batch()
    batch = {**plain, "routed_experts": routes}
    result = {"replayed": forward_rows(chunks, spec, batch, replay),
              "live": forward_rows(chunks, spec, plain, replay)}
    replay.check(routes)
    try:
        replay.check(routes[..., :1])
    except ValueError as err:
        result["mismatch_error"] = str(err)
    if name == "dp4":
        result.update(teacher_check(hf_dir, fields, plain))
    result["step"] = train_step(chunks, optimizer, scheduler, slice_for_data_parallel(batch),
                                tc.toy_loss(spec.vocab_size), micro_batch_size, replay)
    result["live_after_step"] = all(  # e.g. the sync probe after the step routes live
        router.router_replay.router_replay_action is None and not router.router_replay.
        replay_backward_list for routers in replay.routers.values() for router in routers)
    teardown_parallel()
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--hf", required=True)
    parser.add_argument("--routes", required=True)
    parser.add_argument("--layouts", required=True, help="comma-separated names")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    routes = torch.load(args.routes)
    results = {name: run_layout(args.hf, name, routes) for name in args.layouts.split(",")}
    report(args.out, dist.get_rank(), results)


if __name__ == "__main__":
    main()
