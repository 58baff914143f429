"""Student stage, rollout routing replay (R3): the student's MoE routers use the experts the
rollout engine chose for every token, through Megatron-Core's `RouterReplay`.

Why: the engine and the trainer route independently, and small numerical differences send
tokens to other experts (about 10% of router decisions on Qwen3-30B-A3B), so π_θ in the
trainer is not the policy that sampled; IcePop then gates good tokens away.

Routes in a batch: `routed_experts` [B, S, L, k] (small int dtype), entry [b, t, l] the top-k
expert ids (global) of input token t in decoder layer l, −1 where the engine recorded none
(padding, the last token, a missing route). A layer's router sees its tokens in Megatron's
order, row `pos * b + seq` over this rank's sequence shard (with sequence parallelism, rows
of positions [r·S/tp, (r+1)·S/tp) on TP rank r); each pipeline stage has its own layers.

For each MoE router `ReplayRoutes.resolve` takes the engine's ids on rows that have them and
the live router's top-k elsewhere (the fallback, counted), so −1 never reaches an expert.
The routing weights are gathered from the router's dense scores at those ids, so the router
keeps its gradient. Activation recompute replays the ids the forward resolved
(`REPLAY_BACKWARD`). MTP routers never replay, and frozen teachers are built without replay.

Per step the replayer counts, over the (token, layer) routes the loss depends on (positions
up to each sequence's last trained one): how many the engine recorded (replayed) and on how
many the live router already agreed with the engine.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction
from megatron.core.utils import get_model_config
from torch import Tensor

from mopd_megatron.trajectory import ROUTES_KEY, route_dtype  # noqa: F401 (re-export)


class ReplayRoutes(RouterReplay):
    """One MoE router's replay: engine ids where recorded, the live top-k elsewhere."""

    def __init__(self):
        super().__init__()
        RouterReplay.global_router_replay_instances.remove(self)  # driven per model, not globally
        self.live: Tensor | None = None
        """The live router's top-k of the last replayed forward (for the agreement count)."""

    def set_target_indices(self, topk_indices: Tensor) -> None:
        self.target_topk_idx = topk_indices  # the forward queues what it resolves instead

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                        default_compute_topk=None):
        if self.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
            _, self.live = default_compute_topk(scores, topk, num_groups=num_groups,
                                                group_topk=group_topk)
            target = self.target_topk_idx.to(scores.device, torch.long)
            recorded = (target >= 0).all(-1, keepdim=True)
            indices = torch.where(recorded, target, self.live)
            self.replay_backward_list.append(indices)
        elif self.router_replay_action == RouterReplayAction.REPLAY_BACKWARD:
            indices = self.replay_backward_list.pop(0)
        else:
            return default_compute_topk(scores, topk, num_groups, group_topk)
        return scores.gather(1, indices), indices


def _routers(chunk: torch.nn.Module) -> list[TopKRouter]:
    """The decoder's MoE routers of a model chunk (MTP routers excluded), in layer order."""
    return [module for name, module in chunk.named_modules()
            if isinstance(module, TopKRouter) and ".mtp." not in f".{name}"]


class RouteReplayer:
    """Drives the replay of one student's routers, micro-batch by micro-batch.

    Args:
        chunks: the student's model chunks, built with `moe_enable_routing_replay=True`.
        num_layers: decoder layers of the model (the engine's layer axis).
    """

    def __init__(self, chunks: list[torch.nn.Module], num_layers: int):
        config = get_model_config(chunks[0])
        if config.moe_router_fusion or config.moe_router_load_balancing_type == "sinkhorn":
            raise ValueError(
                "rollout.routing_replay needs Megatron's unfused top-k router: "
                f"moe_router_fusion={config.moe_router_fusion} and "
                f"moe_router_load_balancing_type={config.moe_router_load_balancing_type!r} "
                "bypass RouterReplay; turn them off or set rollout.routing_replay: false")
        self.num_layers, self.topk = num_layers, config.moe_router_topk
        self.num_experts = config.num_moe_experts
        self.sequence_parallel = config.sequence_parallel
        self.routers: dict[int, list[TopKRouter]] = {}
        for chunk in chunks:
            for name, module in chunk.named_modules():
                if isinstance(module, TopKRouter) and module.router_replay is not None:
                    RouterReplay.global_router_replay_instances.remove(module.router_replay)
                    module.router_replay = None  # MTP routers stay live
            self.routers[id(chunk)] = _routers(chunk)
            for router in self.routers[id(chunk)]:
                router.router_replay = ReplayRoutes()
        self.counts = torch.zeros(3, dtype=torch.float64)

    def check(self, routes: Tensor) -> None:
        """Refuse routes whose layer count, top-k or expert ids do not fit this student."""
        layers, topk = routes.shape[-2:]
        if (layers, topk) != (self.num_layers, self.topk):
            raise ValueError(
                f"routing replay: the rollout engine returned routes for {layers} layers x "
                f"top-{topk}, the trainer's student has {self.num_layers} layers x "
                f"top-{self.topk}; serve the same model or set rollout.routing_replay: false")
        if routes.numel() and int(routes.max()) >= self.num_experts:
            raise ValueError(f"routing replay: the engine routed to expert {int(routes.max())}, "
                             f"the trainer's student has {self.num_experts} experts")

    def reset(self) -> None:
        """Start a step: zero counts."""
        self.counts.zero_()

    def release(self) -> None:
        """After a schedule: no queued routes, every router live again (other forwards, e.g.
        the sync probe, route live)."""
        for routers in self.routers.values():
            for router in routers:
                router.router_replay.clear_indices()
                router.router_replay.clear_router_replay_action()

    def before_forward(self, chunk: torch.nn.Module, micro_batch: dict) -> None:
        """Hand each router of `chunk` its rows of the micro-batch's routes (live routing when
        the micro-batch has none)."""
        routes = micro_batch.get(ROUTES_KEY)
        for router in self.routers[id(chunk)]:
            replay = router.router_replay
            if routes is None:
                replay.clear_router_replay_action()
                continue
            replay.set_target_indices(self._rows(routes[:, :, router.layer_number - 1]))
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        self._counted = None if routes is None else self._rows(_counted_positions(micro_batch))

    def after_forward(self, chunk: torch.nn.Module) -> None:
        """Count this forward's routes; a recompute in the backward replays what it used."""
        for router in self.routers[id(chunk)]:
            replay = router.router_replay
            if replay.router_replay_action != RouterReplayAction.REPLAY_FORWARD:
                continue
            replay.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
            target = replay.target_topk_idx.to(replay.live.device, torch.long)
            counted = self._counted.to(target.device)
            recorded = (target >= 0).all(-1) & counted
            agree = (target.sort(-1).values == replay.live.sort(-1).values).all(-1) & recorded
            self.counts += torch.tensor(
                [counted.sum(), recorded.sum(), agree.sum()], dtype=torch.float64)

    def totals(self) -> dict[str, float]:
        """This step's counts summed over all ranks (each rank holds distinct tokens or
        layers): routes the loss depends on, replayed ones, ones the live router agreed on."""
        counts = self.counts.clone()
        if dist.is_initialized():
            dist.all_reduce(counts)
        routes, replayed, agreed = counts.tolist()
        return {"routes": routes, "routes_replayed": replayed, "routes_agreed": agreed}

    def _rows(self, per_token: Tensor) -> Tensor:
        """[b, S, ...] -> this rank's router rows [s_local * b, ...] (`pos * b + seq`)."""
        rows = per_token.transpose(0, 1)
        if self.sequence_parallel:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            shard = rows.shape[0] // tp
            rank = parallel_state.get_tensor_model_parallel_rank()
            rows = rows[rank * shard : (rank + 1) * shard]
        return rows.reshape(-1, *per_token.shape[2:])


def _counted_positions(micro_batch: dict) -> Tensor:
    """[b, S] bool: the positions the loss depends on, up to each row's last trained one
    (every position, without a loss mask)."""
    tokens = micro_batch["tokens"]
    mask = micro_batch.get("loss_mask")
    if mask is None:
        return torch.ones_like(tokens, dtype=torch.bool)
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    last = torch.where(mask > 0, positions, -1).max(dim=1).values
    return positions[None, :] <= last[:, None]
