"""Student stage: gradient reduction, Adam and the learning-rate schedule, all Megatron-Core's.

`setup_optimizer` turns the student's model chunks into what `train_step` needs:

- every chunk wrapped in Megatron's `DistributedDataParallel` (grads accumulated in fp32
  buffers, summed over data-parallel ranks; `finalize_model_grads` later divides them by the
  global number of loss units, see `student.train_step`);
- `get_megatron_optimizer` (Adam with decoupled weight decay, no decay on biases and norms,
  clipping by the global grad norm; a `ChainedOptimizer` of dense and expert parameters);
- Megatron's `OptimizerParamScheduler`: linear warm-up from lr/(warmup+1) to lr over
  `warmup_steps`, then constant, cosine or linear decay to `min_lr` at `total_steps`.

Expert gradients. Megatron 0.16.1 routes a parameter's gradient through the expert
data-parallel group only when it carries `allreduce=False`, which its layers set only when
expert parallelism is on (ep > 1). With ep = 1 and an expert tensor-parallel size below tp
(etp=1 < tp, the layout gloo needs), every TP rank holds a full copy of the experts and
feeds it a different sequence-parallel shard, so the copies' gradients must be summed over
the expert data-parallel group; left as dense parameters they are reduced over the dense
data-parallel group only, and the copies drift apart. `wrap_ddp` therefore marks every
expert parameter `allreduce=False` in every layout. This also gives the optimizer the same
dense/expert split (and checkpoint structure) at every layout.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
)
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.moe.experts import (
    GroupedMLP,
    SequentialMLP,
    TEGroupedMLP,
)
from megatron.core.utils import get_model_config

from mopd_megatron.config import OptimizerConfig

_EXPERT_MODULES = (SequentialMLP, GroupedMLP, TEGroupedMLP)


def mark_expert_params(module: torch.nn.Module) -> int:
    """Tag the routed experts' parameters `allreduce=False` (see the module docstring).

    Args:
        module: a model chunk (unwrapped).

    Returns:
        The number of parameters tagged.
    """
    count = 0
    for sub in module.modules():
        if isinstance(sub, _EXPERT_MODULES):
            for param in sub.parameters():
                param.allreduce = False
                count += 1
    return count


def wrap_ddp(
    model_chunks: list[torch.nn.Module], distributed_optimizer: bool = False
) -> list[DistributedDataParallel]:
    """Wrap each chunk in Megatron's DDP (fp32 grad buffers, synchronous reduction).

    Args:
        model_chunks: the student's chunks (one per virtual pipeline stage).
        distributed_optimizer: lay the gradient buffers out for the distributed optimizer
            (grads reduce-scattered over DP; NCCL only, it fails on gloo).

    Returns:
        The wrapped chunks, in order.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    wrapped = []
    for index, chunk in enumerate(model_chunks):
        mark_expert_params(chunk)
        wrapped.append(
            DistributedDataParallel(
                config=get_model_config(chunk),
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=index > 0,
            )
        )
    return wrapped


def build_optimizer(
    ddp_chunks: list[DistributedDataParallel], cfg: OptimizerConfig
) -> MegatronOptimizer:
    """Megatron's Adam over DDP-wrapped chunks (fp32 main params under bf16).

    Args:
        ddp_chunks: chunks from `wrap_ddp`.
        cfg: the optimizer stage of the recipe.

    Returns:
        A `ChainedOptimizer` (dense and, for MoE, expert parameters).
    """
    model_config = get_model_config(ddp_chunks[0])
    megatron_cfg = MegatronOptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=model_config.bf16,
        fp16=model_config.fp16,
        params_dtype=model_config.params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    return get_megatron_optimizer(megatron_cfg, ddp_chunks)


def build_scheduler(
    optimizer: MegatronOptimizer, cfg: OptimizerConfig, total_steps: int
) -> OptimizerParamScheduler:
    """Warm-up then decay, stepped once per optimizer step.

    Args:
        optimizer: from `build_optimizer`.
        cfg: the optimizer stage of the recipe (lr, min_lr, warmup_steps, decay, weight_decay).
        total_steps: the step at which a decaying schedule reaches `min_lr`.

    Returns:
        The scheduler; it has already set the learning rate of step 0.
    """
    warmup = cfg.warmup_steps
    return OptimizerParamScheduler(
        optimizer,
        init_lr=cfg.lr / (warmup + 1),
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=cfg.decay,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def setup_optimizer(
    model_chunks: list[torch.nn.Module], cfg: OptimizerConfig, total_steps: int
) -> tuple[list[DistributedDataParallel], MegatronOptimizer, OptimizerParamScheduler]:
    """DDP + Adam + schedule for the student (see the module docstring).

    Args:
        model_chunks: the student's chunks from `build_student`.
        cfg: the optimizer stage of the recipe.
        total_steps: training steps (the end of a decaying schedule).

    Returns:
        (DDP-wrapped chunks to train and checkpoint, optimizer, scheduler).
    """
    ddp_chunks = wrap_ddp(model_chunks, cfg.use_distributed_optimizer)
    optimizer = build_optimizer(ddp_chunks, cfg)
    return ddp_chunks, optimizer, build_scheduler(optimizer, cfg, total_steps)
