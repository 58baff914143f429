"""full_rkl / forward_kl from served hidden states vs from local teachers (2 ranks).

For each case (a loss at a layout): one `train_step` of the tiny MoE student with the exact
KL against
(a) the teacher run locally at the student's layout (`LocalTeachers`) and (b) the teacher's
served hidden states (the batch's `teacher_hidden`, from the embedded engine on the pytest
side) through its LM-head shard (`TeacherHeads`), each from the same initial weights.
Adam's eps is large enough that its first step does not blow float noise in near-zero
gradients up to full-size steps (g / (|g| + eps)), so the weights compare at fp32 precision.
Every rank reports both losses, the largest difference between the two updated parameter
sets and the largest update, and the bytes its LM-head shard holds.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from multirank import report

CASES = {"full_rkl/tp1": ("full_rkl", {}),
         "full_rkl/tp2sp": ("full_rkl", {"tp": 2, "sequence_parallel": True}),
         "forward_kl/tp2sp": ("forward_kl", {"tp": 2, "sequence_parallel": True})}


def train_once(student_dir: str, teacher_dir: str, loss_name: str, fields: dict, batch: dict,
               served: bool):
    from megatron.core import parallel_state

    from mopd_megatron.config import AlgorithmConfig, ModelConfig, OptimizerConfig, ParallelConfig
    from mopd_megatron.hf.layout import padded_vocab_size
    from mopd_megatron.hf.spec import read_hf_config
    from mopd_megatron.mopd.objectives import LossContext, build_objective
    from mopd_megatron.student.local_teacher import LocalTeachers
    from mopd_megatron.student.model import build_student
    from mopd_megatron.student.optimizer import setup_optimizer
    from mopd_megatron.student.parallel import init_parallel, teardown_parallel
    from mopd_megatron.student.teacher_heads import TeacherHeads
    from mopd_megatron.student.train_step import slice_for_data_parallel, train_step

    parallel, spec, model = ParallelConfig(**fields), read_hf_config(student_dir), ModelConfig(
        hf_path=student_dir)
    init_parallel(parallel, seed=1234, spec=spec)
    chunks, _ = build_student(student_dir, model, parallel, spec)
    chunks, optimizer, scheduler = setup_optimizer(
        chunks, OptimizerConfig(lr=1e-2, adam_eps=1e-4), 10)
    before = [p.detach().clone() for p in chunks[0].parameters()]
    ctx = LossContext(vocab_size=spec.vocab_size,
                      tp_group=parallel_state.get_tensor_model_parallel_group(),
                      teacher_payload="hidden_states" if served else "")
    objective = build_objective(AlgorithmConfig(loss=loss_name), ctx)
    head_bytes = 0
    if served:
        padded = padded_vocab_size(spec.vocab_size, model.make_vocab_size_divisible_by,
                                   parallel.tp)
        heads = TeacherHeads({0: ("teacher", teacher_dir)}, spec.vocab_size, padded)
        loss, head_bytes = heads.wrap(objective), heads.bytes
    else:
        loss = LocalTeachers({0: teacher_dir}, ModelConfig(hf_path=student_dir),
                             parallel).wrap(objective)
    metrics = train_step(chunks, optimizer, scheduler, slice_for_data_parallel(batch), loss, 2)
    after = [p.detach().clone() for p in chunks[0].parameters()]
    teardown_parallel()
    return metrics, before, after, head_bytes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--batch", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    batch = torch.load(args.batch)
    results = {}
    for name, (loss_name, fields) in CASES.items():
        local, before, local_after, _ = train_once(args.student, args.teacher, loss_name, fields,
                                                   batch, served=False)
        served, _, served_after, head_bytes = train_once(args.student, args.teacher, loss_name,
                                                         fields, batch, served=True)
        results[name] = {
            "local_loss": local["loss"], "served_loss": served["loss"],
            "local_kl": local["kl_sum"], "served_kl": served["kl_sum"],
            "weight_diff": max(float((a - b).abs().max())
                               for a, b in zip(local_after, served_after)),
            "update": max(float((a - b).abs().max()) for a, b in zip(local_after, before)),
            "head_bytes": head_bytes,
        }
    report(args.out, dist.get_rank(), results)


if __name__ == "__main__":
    main()
