"""Student stage: one optimizer step on this DP rank's share of a batch, at any layout.

Loss normalisation. The caller's loss returns, per micro-batch, a *sum* over its units
(MOPD: loss_sum = Σ_seq (1/|y_s|) Σ_t term_t, with num_units = number of sequences). The step
follows Megatron's `calculate_per_token_loss` path: each micro-batch backpropagates its
loss_sum unscaled, DDP sums the gradients over data-parallel ranks (expert gradients over the
expert data-parallel group), and `finalize_model_grads` divides them by Σ num_units over all
micro-batches and DP ranks. The update therefore follows

    ∇ (Σ_mb,dp loss_sum) / (Σ_mb,dp num_units),

which depends neither on the layout (TP / PP / EP / DP) nor on the number of micro-batches.
Then Adam steps (after clipping by the global grad norm) and the scheduler advances.

Batch: see `student.forward` (dim 0 = sequences; per-token tensors aligned with the logits,
entry t about targets[:, t] = tokens[:, t + 1]). `slice_for_data_parallel` cuts a global
batch into this DP rank's contiguous share; every DP rank gets the same number of sequences
(expert-parallel all-to-alls need the same micro-batch count on every rank).

The loss contract, `loss_fn(logits, micro_batch) -> (loss_sum, num_units, metrics)`:
    logits      [b, s, V_padded / tp]: this TP rank's vocabulary shard (last PP stage only).
    micro_batch the batch's rows for this micro-batch (plus `targets` [b, s]).
    loss_sum    scalar Tensor, differentiable: the sum of the loss over the micro-batch's units.
    num_units   integer-valued scalar Tensor (e.g. the number of sequences with tokens).
    metrics     dict[str, scalar Tensor] of sums (token counts, KL sums, ...); the step adds
                them over micro-batches and DP ranks and reports the totals.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import (
    OptimizerParamScheduler,
    get_canonical_lr_for_logging,
)
from megatron.core.utils import get_model_config
from torch import Tensor

from mopd_megatron.student.forward import Batch, prepare_micro_batches, run_schedule
from mopd_megatron.student.routing_replay import RouteReplayer

LossFn = Callable[[Tensor, Batch], tuple[Tensor, Tensor, dict[str, Tensor]]]
"""`loss_fn(logits, micro_batch) -> (loss_sum, num_units, metrics)`; see the module docstring."""

RESERVED_METRICS = ("loss", "num_units", "grad_norm", "lr", "update_successful")
"""Keys `train_step` reports itself; a loss must not use them for its metrics."""


def slice_for_data_parallel(batch: Batch) -> Batch:
    """This DP rank's contiguous share of a global batch.

    Args:
        batch: the global batch (identical on every rank), sequences along dim 0.

    Returns:
        Rows [r * B / dp, (r + 1) * B / dp) of every tensor, r = this DP rank.

    Raises:
        ValueError: B is not divisible by the data-parallel size.
    """
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    total = batch["tokens"].shape[0]
    if total % dp:
        raise ValueError(f"a batch of {total} sequences cannot be split over {dp} DP ranks")
    share = total // dp
    return {key: value[rank * share : (rank + 1) * share] for key, value in batch.items()}


def train_step(
    model_chunks: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    batch: Batch,
    loss_fn: LossFn,
    micro_batch_size: int,
    replay: RouteReplayer | None = None,
) -> dict[str, float]:
    """Forward, backward and one optimizer step on this DP rank's share of the batch.

    Every rank calls it together (see `slice_for_data_parallel`).

    Args:
        model_chunks: DDP-wrapped chunks from `student.optimizer.setup_optimizer`.
        optimizer: from `setup_optimizer`.
        scheduler: from `setup_optimizer`; advanced by one step after a successful update.
        batch: this DP rank's sequences (see `slice_for_data_parallel`).
        loss_fn: the caller's loss (contract in the module docstring).
        micro_batch_size: sequences per micro-batch.
        replay: replays the batch's `routed_experts` (see `student.routing_replay`); its
            counts join the returned metrics.

    Returns:
        The same dict on every rank: `loss` (Σ loss_sum / Σ num_units), `num_units`,
        `grad_norm`, `lr` (used by this step), `update_successful` (1.0 or 0.0), and the
        loss's metrics summed over micro-batches and DP ranks.
    """
    config = get_model_config(model_chunks[0])
    if not config.calculate_per_token_loss:
        raise ValueError("train_step needs a model built with calculate_per_token_loss=True")
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    def step_loss(micro_batch: Batch, logits: Tensor):
        loss_sum, num_units, metrics = loss_fn(logits, micro_batch)
        clash = set(metrics) & set(RESERVED_METRICS)
        if clash:
            raise ValueError(f"loss metrics use names train_step reports itself: {sorted(clash)}")
        reported = {"loss": loss_sum, "num_units": num_units, **metrics}
        reported = {key: value.detach().double() for key, value in reported.items()}
        return loss_sum, num_units.to(torch.int), reported

    micro_batches = prepare_micro_batches(model_chunks, batch, micro_batch_size)
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    if replay is not None:
        replay.reset()
    stored = run_schedule(model_chunks, micro_batches, step_loss, forward_only=False,
                          replay=replay)
    lr = get_canonical_lr_for_logging(optimizer.param_groups)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    totals = _reduce_metrics(stored)
    totals["loss"] /= max(totals["num_units"], 1.0)
    if replay is not None:
        totals.update(replay.totals())
    totals.update(
        grad_norm=float(grad_norm or 0.0),
        lr=float(lr),
        update_successful=float(update_successful),
    )
    return totals


def _reduce_metrics(stored: list[dict[str, Tensor]]) -> dict[str, float]:
    """Sum the last stage's per-micro-batch sums over DP ranks and share them with every stage."""
    totals = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        keys = list(stored[0])
        sums = torch.stack([torch.stack([mb[key] for key in keys]) for mb in stored]).sum(0)
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(sums, group=dp_group)
        totals = dict(zip(keys, sums.tolist(), strict=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        shared = [totals]
        dist.broadcast_object_list(
            shared,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        totals = shared[0]
    return totals
