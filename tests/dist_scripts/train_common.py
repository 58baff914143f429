"""Shared pieces of the student training / checkpoint scripts (and their pytest side).

The toy problem: 8 right-padded sequences of varying length over the tiny 42-token
vocabulary, a per-token loss mask over a "response" suffix (one sequence has none), random
per-token weights, and the per-sequence-normalised weighted cross-entropy

    loss = mean over sequences with tokens of  −(1/|y_s|) Σ_t w_t log π(targets_t),

computed with the vocabulary-parallel kernel. Light at import time: megatron is only
imported inside the functions that need it.
"""

from __future__ import annotations

import time

import torch

LAYOUTS = {
    # name: (ParallelConfig fields, micro_batch_size); the global batch has 8 sequences.
    "dp4": (dict(), 1),
    "tp2": (dict(tp=2), 4),
    "pp2": (dict(pp=2), 1),
    "ep2": (dict(ep=2), 2),
    "tp2ep2": (dict(tp=2, ep=2), 3),
}

SEQUENCES, LENGTH, VOCAB = 8, 11, 42


def toy_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """tokens [8, 11] (right-padded with 0), loss_mask and weights [8, 11] aligned to targets."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (SEQUENCES, LENGTH), generator=gen)
    lengths = torch.tensor([11, 9, 7, 11, 5, 10, 8, 6])
    prompts = torch.tensor([3, 2, 4, 5, 2, 3, 8, 1])  # sequence 6: prompt to the end, no loss
    positions = torch.arange(LENGTH)
    tokens[positions[None, :] >= lengths[:, None]] = 0
    # target t = tokens[t + 1] is a response token when prompt <= t + 1 < length
    loss_mask = ((positions[None, :] + 1 >= prompts[:, None])
                 & (positions[None, :] + 1 < lengths[:, None])).float()
    weights = 0.5 + torch.rand(SEQUENCES, LENGTH, generator=gen)
    return {"tokens": tokens, "loss_mask": loss_mask, "weights": weights}


def sequence_losses(logprob: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence −(1/|y|) Σ_t w_t logprob_t [B] and the count of sequences with tokens."""
    from mopd_megatron.mopd.objectives import sequence_mean

    mask = batch["loss_mask"]
    per_seq = -sequence_mean(batch["weights"] * logprob, mask)
    return per_seq, (mask.sum(-1) > 0).sum()


def toy_loss(vocab_size: int):
    """The train_step loss_fn of the toy problem."""
    from mopd_megatron.student.forward import token_logprobs

    def loss_fn(logits, mb):
        logprob, entropy = token_logprobs(logits, mb["targets"], vocab_size=vocab_size)
        per_seq, num_units = sequence_losses(logprob, mb)
        mask = mb["loss_mask"]
        metrics = {"tokens": mask.sum(), "entropy_sum": (entropy.detach() * mask).sum()}
        return per_seq.sum(), num_units, metrics

    return loss_fn


def hf_reference(hf_dir, batch: dict) -> dict[str, torch.Tensor]:
    """transformers' log π(targets), entropy [B, S] and the toy loss for `batch`."""
    from transformers import AutoModelForCausalLM

    from mopd_megatron.student.forward import next_token_targets

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(batch["tokens"]).logits.float(), dim=-1)
    logprob = logp.gather(-1, next_token_targets(batch["tokens"])[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    per_seq, num_units = sequence_losses(logprob, batch)
    return {"logprob": logprob, "entropy": entropy, "loss": per_seq.sum() / num_units}


def build(hf_dir, parallel_fields: dict, *, lr: float = 1e-2, total_steps: int = 10):
    """init_parallel + build_student + setup_optimizer at a layout (world from torchrun)."""
    from mopd_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
    from mopd_megatron.hf.spec import read_hf_config
    from mopd_megatron.student.model import build_student
    from mopd_megatron.student.optimizer import setup_optimizer
    from mopd_megatron.student.parallel import init_parallel

    parallel = ParallelConfig(**parallel_fields)
    init_parallel(parallel, seed=1234, spec=read_hf_config(hf_dir))
    chunks, spec = build_student(hf_dir, ModelConfig(hf_path=str(hf_dir)), parallel)
    opt = OptimizerConfig(lr=lr, warmup_steps=1, decay="cosine", min_lr=lr / 10,
                          weight_decay=0.1, clip_grad=1.0)
    ddp_chunks, optimizer, scheduler = setup_optimizer(chunks, opt, total_steps)
    return ddp_chunks, optimizer, scheduler, spec


def timed_step(chunks, optimizer, scheduler, batch, spec, micro_batch_size) -> dict:
    """One train_step on this DP rank's share of the toy batch, with its wall time."""
    from mopd_megatron.student.train_step import slice_for_data_parallel, train_step

    start = time.perf_counter()
    metrics = train_step(chunks, optimizer, scheduler, slice_for_data_parallel(batch),
                         toy_loss(spec.vocab_size), micro_batch_size)
    metrics["seconds"] = time.perf_counter() - start
    return metrics


def forward_rows(chunks, spec, batch: dict) -> tuple[list, list]:
    """forward_logprobs of the whole batch (every DP rank's share, in DP order) as lists."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mopd_megatron.student.forward import forward_logprobs
    from mopd_megatron.student.train_step import slice_for_data_parallel

    logprob, entropy = forward_logprobs(chunks, slice_for_data_parallel(batch), 2,
                                        vocab_size=spec.vocab_size)
    group = parallel_state.get_data_parallel_group()
    shares = [None] * dist.get_world_size(group)
    dist.all_gather_object(shares, (logprob.tolist(), entropy.tolist()), group=group)
    return tuple([row for share in shares for row in share[i]] for i in range(2))


def exported_weights(chunks, spec) -> torch.Tensor:
    """Every HF tensor of the model, as this rank sees it, flattened in name order."""
    from mopd_megatron.student.hf_weights import export_hf_weights

    tensors = dict(kv for bucket in export_hf_weights(chunks, spec) for kv in bucket)
    return torch.cat([tensors[name].flatten().float() for name in sorted(tensors)])


def replica_max_diff(vector: torch.Tensor) -> float:
    """Largest |this rank's copy − rank 0's| over all ranks (0 when every copy agrees)."""
    import torch.distributed as dist

    reference = vector.clone()
    dist.broadcast(reference, src=0)
    diff = (vector - reference).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


SEGMENTS = [(3, 4, 3, 2, 4, 3), (2, 3, 5, 4, 0, 0), (4, 2, 2, 2, 2, 5), (1, 6, 1, 1, 3, 2),
            (5, 2, 4, 3, 0, 0), (2, 2, 2, 2, 2, 2), (3, 1, 6, 1, 1, 4), (2, 5, 2, 5, 0, 0)]
"""Multi-turn trajectories, per sequence: prompt, turn, observation, turn, observation,
turn lengths."""


def multi_turn_trajectories(vocab: int, garbage: bool = False, topk: int = 4, seed: int = 0):
    """Fixed scored multi-turn trajectories. With `garbage`, the masked positions (prompt,
    observations) carry teacher values that no loss may ever read."""
    from mopd_megatron.trajectory import Trajectory

    gen = torch.Generator().manual_seed(seed)
    out = []
    for group, segments in enumerate(SEGMENTS):
        mask = [m for n, m in zip(segments, [0, 1, 0, 1, 0, 1]) for _ in range(n)]
        length = len(mask)
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        lp = (-torch.rand(length, generator=gen) * 3).tolist()
        top_ids = [torch.randperm(vocab, generator=gen)[:topk].tolist() for _ in range(length)]
        top_lp = [sorted((-torch.rand(topk, generator=gen) * 4).tolist(), reverse=True)
                  for _ in range(length)]
        keep = [bool(m) or garbage for m in mask]
        out.append(Trajectory(
            ids, mask, [x if m else 0.0 for x, m in zip(lp, mask)], domain="echo",
            group=group // 2, reward=float(group % 3 == 0), environment="echo", turns=3,
            teacher_logprobs=[x if m else (-40.0 if garbage else 0.0) for x, m in zip(lp, mask)],
            teacher_topk_ids=[r if k else [] for r, k in zip(top_ids, keep)],
            teacher_topk_logprobs=[r if k else [] for r, k in zip(top_lp, keep)]))
    return out
