"""Student stage: the per-token forward over micro-batches, at any TP / PP / EP layout.

Alignment (defined here, once). Position t of the logits predicts the *next* token:

    logits[:, t]  ->  targets[:, t] = tokens[:, t + 1]

and every per-token tensor of a batch ([B, S, ...]: loss_mask, advantages, behaviour and
teacher log-probs, teacher top-k) is indexed the same way, entry t describing targets[:, t]
(this is Megatron's `labels`/`loss_mask` convention). The last position has no target and
must carry loss_mask 0. `batch["targets"]` is used when present (`mopd.batch` builds it),
otherwise `next_token_targets(tokens)`.

A batch is a dict of tensors whose dim 0 is the sequence: `tokens` [B, S] int64 right-padded,
optional `position_ids` [B, S] and `targets` [B, S], and whatever else the loss reads
([B], [B, S], [B, S, k], ...). With sequence parallelism Megatron needs S divisible by tp, so
`pad_sequence` right-pads every [B, S, ...] tensor with zeros (a 0 loss_mask ignores them),
the engine's routes `routed_experts` [B, S, L, k] with −1 (no route: never expert 0).

Micro-batches of `micro_batch_size` sequences run through Megatron's
`get_forward_backward_func` (no pipelining, or 1F1B / interleaved 1F1B under PP). On the last
pipeline stage a chunk returns the vocabulary shard of the logits, [b, s, V_padded / tp].
`forward_logprobs` turns them into log π(targets) and the entropy, [B, S] each, with the
vocabulary-parallel kernel (the vocabulary is never gathered) and broadcasts them to every
pipeline stage.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config
from torch import Tensor

from mopd_megatron.mopd.objectives import token_logprob_entropy
from mopd_megatron.student.routing_replay import ROUTES_KEY, RouteReplayer

Batch = dict[str, Tensor]
"""Sequences along dim 0; see the module docstring for the keys."""


def next_token_targets(tokens: Tensor) -> Tensor:
    """targets[:, t] = tokens[:, t + 1]; the last column (no next token) is 0.

    Args:
        tokens: [B, S] int64.

    Returns:
        [B, S] int64.
    """
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    return targets


def token_logprobs(
    logits: Tensor, targets: Tensor, *, vocab_size: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """`mopd.objectives.token_logprob_entropy` over this rank's TP group: (logprob, entropy)
    [b, s] from the vocabulary shard [b, s, V_local] of the logits."""
    return token_logprob_entropy(logits, targets, vocab_size=vocab_size, temperature=temperature,
                                 tp_group=parallel_state.get_tensor_model_parallel_group())


def pad_sequence(batch: Batch, multiple: int) -> Batch:
    """Right-pad every [B, S, ...] tensor so that S is a multiple of `multiple` (zeros; −1 for
    the routes, which mark "no route")."""
    length = batch["tokens"].shape[1]
    extra = -length % multiple
    if not extra:
        return batch
    padded = {}
    for key, value in batch.items():
        if value.dim() >= 2 and value.shape[1] == length:
            fill = -1 if key == ROUTES_KEY else 0
            pad = value.new_full((value.shape[0], extra, *value.shape[2:]), fill)
            value = torch.cat([value, pad], dim=1)
        padded[key] = value
    return padded


def prepare_micro_batches(
    model_chunks: list[torch.nn.Module], batch: Batch, micro_batch_size: int
) -> list[Batch]:
    """Cut a batch into micro-batches of `micro_batch_size` sequences (the last may be short).

    Attaches `targets` when absent, pads S for sequence parallelism (see the module
    docstring) and moves the tensors to the model's device. Under pipeline parallelism every
    micro-batch must be full.

    Args:
        model_chunks: the student's chunks on this rank.
        batch: this DP rank's sequences.
        micro_batch_size: sequences per micro-batch.

    Returns:
        The micro-batches, in order.
    """
    if parallel_state.get_context_parallel_world_size() > 1:
        raise NotImplementedError("context parallelism needs the batch split over CP ranks")
    num = batch["tokens"].shape[0]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1 and num % micro_batch_size:
        raise ValueError(
            f"pipeline parallelism needs equal micro-batches: {num} sequences on this DP rank "
            f"are not divisible by micro_batch_size = {micro_batch_size}"
        )
    if "targets" not in batch:
        batch = {**batch, "targets": next_token_targets(batch["tokens"])}
    if get_model_config(model_chunks[0]).sequence_parallel:
        batch = pad_sequence(batch, parallel_state.get_tensor_model_parallel_world_size())
    device = next(model_chunks[0].parameters()).device
    return [
        {key: value[start : start + micro_batch_size].to(device) for key, value in batch.items()}
        for start in range(0, num, micro_batch_size)
    ]


def run_schedule(
    model_chunks: list[torch.nn.Module],
    micro_batches: list[Batch],
    loss_func: Callable,
    *,
    forward_only: bool,
    replay: RouteReplayer | None = None,
) -> list:
    """Run the micro-batches through Megatron's forward(-backward) schedule.

    Args:
        model_chunks: the student's chunks (DDP-wrapped for training).
        micro_batches: from `prepare_micro_batches`.
        loss_func: `loss_func(micro_batch, logits)` on the last stage; for training it returns
            Megatron's (loss, num_tokens, reported) triple, with `forward_only` it returns the
            data to collect.
        forward_only: no backward pass (and the schedule collects `loss_func`'s data).
        replay: replays the micro-batches' `routed_experts` in the MoE routers (forward and
            recompute); None = live routing.

    Returns:
        What the schedule stored on the last pipeline stage, one entry per micro-batch
        (empty on other stages).
    """

    config = get_model_config(model_chunks[0])
    if len(model_chunks) > 1 and config.pipeline_model_parallel_size == 2 and config.batch_p2p_comm:
        # Both directions then join the same rank pair in one batch, and their messages
        # (activations, gradients of the same shape) can be matched to the wrong buffers.
        raise ValueError("interleaved pipelining with pp=2 needs batch_p2p_comm=False")

    def forward_step(data_iterator, model):
        micro_batch = next(data_iterator)
        if replay is not None:
            replay.before_forward(model, micro_batch)
        output = model(micro_batch["tokens"], micro_batch.get("position_ids"), None)
        if replay is not None:
            replay.after_forward(model)
        return output, partial(_call_loss, loss_func, micro_batch)

    if len(model_chunks) > 1:
        data_iterator = [iter(micro_batches) for _ in model_chunks]
    else:
        data_iterator = iter(micro_batches)
    tokens = micro_batches[0]["tokens"]
    try:
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=data_iterator,
            model=model_chunks,
            num_microbatches=len(micro_batches),
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=forward_only,
            collect_non_loss_data=forward_only,
        )
    finally:
        if replay is not None:
            replay.release()


def _call_loss(loss_func: Callable, micro_batch: Batch, output: Tensor, non_loss_data=False):
    """Megatron calls `f(output)`, or `f(output, non_loss_data=True)` when collecting data."""
    return loss_func(micro_batch, output)


@torch.no_grad()
def forward_logprobs(
    model_chunks: list[torch.nn.Module],
    batch: Batch,
    micro_batch_size: int,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    replay: RouteReplayer | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probs of the next tokens and the entropy at every position, without gradients.

    Every rank calls it together, each with its DP share (expert-parallel all-to-alls span
    DP ranks, so all DP ranks need the same number of micro-batches).

    Args:
        model_chunks: the student's chunks on this rank.
        batch: this DP rank's sequences (`tokens` [B, S], optional `targets`/`position_ids`).
        micro_batch_size: sequences per forward micro-batch.
        vocab_size: the real vocabulary size (`spec.vocab_size`).
        temperature: π = softmax(logits / temperature) (the rollout temperature).
        replay: see `run_schedule`.

    Returns:
        (logprob [B, S], entropy [B, S]) fp32, on every TP and PP rank of this DP rank;
        position t is about targets[:, t] (the last position is meaningless).
    """
    length = batch["tokens"].shape[1]

    def collect(micro_batch: Batch, logits: Tensor) -> Tensor:
        logprob, entropy = token_logprobs(
            logits, micro_batch["targets"], vocab_size=vocab_size, temperature=temperature
        )
        return torch.stack([logprob, entropy]).float()

    micro_batches = prepare_micro_batches(model_chunks, batch, micro_batch_size)
    stored = run_schedule(model_chunks, micro_batches, collect, forward_only=True, replay=replay)
    tokens = micro_batches[0]["tokens"]
    result = tokens.new_empty((2, batch["tokens"].shape[0], tokens.shape[1]), dtype=torch.float32)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        result = torch.cat(stored, dim=1)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(
            result,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
    return result[0, :, :length], result[1, :, :length]
