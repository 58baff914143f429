"""Student stage: the Megatron student on this rank, as one object.

`Student.build(recipe)` reads the HF config once, initialises the process groups (the only
owner of Megatron's parallel state), builds the model at this rank's TP/PP/EP layout, loads
the HF weights and wraps it in DDP with Adam and the LR schedule. The loop then asks it to

    step(batch, objective)       one optimizer step on the global batch (every rank)
    logprobs(tokens)             log-probs of the next tokens, no gradient (every rank)
    push_weights(sync, version)  export the weights in HF names; rank 0 pushes them
    probe_gap(engine, tokens)    engine vs trainer log-probs after a sync
    save / load                  resumable distributed checkpoints
    export_hf(dir)               the final HF checkpoint

Every method is collective: all ranks call it together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state

from ..config import Recipe, teacher_payload
from ..hf.convert import HF_CONFIG_DIR, save_hf_checkpoint
from ..hf.safetensors_io import copy_hf_metadata
from ..hf.spec import HFModelSpec, read_hf_config
from ..mopd.objectives import LossContext, Objective
from ..sync.probe import probe_gap
from .checkpoint import load_checkpoint, save_checkpoint
from .forward import forward_logprobs
from .hf_weights import export_hf_weights
from .model import build_student
from .optimizer import setup_optimizer
from .parallel import DistInfo, init_parallel, teardown_parallel
from .routing_replay import ROUTES_KEY, RouteReplayer, route_dtype
from .train_step import slice_for_data_parallel, train_step

BUCKET_BYTES = 256 << 20
"""Weights per push to the rollout engine (slime uses ~512 MB buckets for MoE models)."""


@dataclass
class Student:
    """Model chunks (DDP-wrapped), optimizer, scheduler and layout of this rank."""

    recipe: Recipe
    spec: HFModelSpec
    info: DistInfo
    chunks: list[torch.nn.Module]
    optimizer: Any
    scheduler: Any
    replay: RouteReplayer | None = None
    """Replays the rollout engine's routes in the MoE routers (`rollout.routing_replay`)."""

    @classmethod
    def build(cls, recipe: Recipe) -> Student:
        """Process groups, model, HF weights, DDP, optimizer and schedule, as the recipe says."""
        spec = read_hf_config(recipe.model.hf_path)
        info = init_parallel(recipe.parallel, recipe.train.seed, spec, recipe.source)
        replays = recipe.rollout.routing_replay and spec.is_moe
        chunks, _ = build_student(recipe.model.hf_path, recipe.model, recipe.parallel, spec,
                                  moe_enable_routing_replay=replays)
        chunks, optimizer, scheduler = setup_optimizer(chunks, recipe.optimizer,
                                                       recipe.train.steps)
        replay = RouteReplayer(chunks, spec.num_layers) if replays else None
        return cls(recipe, spec, info, chunks, optimizer, scheduler, replay)

    @property
    def is_leader(self) -> bool:
        """Global rank 0: the rank that owns the engines and writes the run's files."""
        return self.info.rank == 0

    def loss_context(self, num_domains: int) -> LossContext:
        """What the objectives need from the student: vocabulary, TP group, temperature."""
        return LossContext(
            vocab_size=self.spec.vocab_size, temperature=self.recipe.rollout.temperature,
            tp_group=parallel_state.get_tensor_model_parallel_group(), num_domains=num_domains,
            teacher_payload=teacher_payload(self.recipe),
        )

    def step(self, batch: dict, objective: Objective) -> dict[str, float]:
        """One optimizer step on the global batch (the same on every rank); see `train_step`.
        With routing replay, a batch without routes replays none (every route is counted as
        a fallback to the live router)."""
        if self.replay is not None:
            if ROUTES_KEY not in batch:
                shape = (*batch["tokens"].shape, self.spec.num_layers, self.replay.topk)
                batch = {**batch, ROUTES_KEY: torch.full(
                    shape, -1, dtype=route_dtype(self.spec.num_experts))}
            self.replay.check(batch[ROUTES_KEY])
        return train_step(self.chunks, self.optimizer, self.scheduler,
                          slice_for_data_parallel(batch), objective,
                          self.recipe.parallel.micro_batch_size, self.replay)

    def logprobs(self, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """[B, S] log p(tokens[:, t+1] | tokens[:, :t+1]) of unpadded sequences (every rank)."""
        logprob, _ = forward_logprobs(self.chunks, {"tokens": tokens}, len(tokens),
                                      vocab_size=self.spec.vocab_size, temperature=temperature)
        return logprob

    def push_weights(self, weight_sync, version: str) -> None:
        """Export the weights bucket by bucket (collective); `weight_sync` (None off rank 0)
        pushes them as they come, in one weight-update session, holding one bucket at a time."""
        buckets = export_hf_weights(self.chunks, self.spec, BUCKET_BYTES)
        if weight_sync is not None:
            weight_sync.push(buckets, weight_version=version)
        for _ in buckets:  # the other ranks take part in the export's collectives
            pass

    def probe_gap(self, engine, tokens: torch.Tensor) -> float | None:
        """Max |log p_engine − log p_trainer| on probe sequences [P, S] without padding.

        After a correct sync it is float noise; it bounds the mismatch IcePop gates. Every
        rank runs the forward; the rank holding `engine` (None elsewhere) returns the gap.
        """
        trainer = self.logprobs(tokens)[:, : tokens.shape[1] - 1]  # position t scores t + 1
        if engine is None:
            return None
        return probe_gap(engine, tokens.tolist(), trainer.tolist())

    def save(self, root: Path, step: int, extra: dict, keep_last: int) -> None:
        """A resumable checkpoint `<root>/iter_<step>`; `<root>/hf_config` beside it makes every
        one convertible with `mopd-megatron convert megatron-to-hf`."""
        if self.is_leader:
            copy_hf_metadata(self.recipe.model.hf_path, Path(root) / HF_CONFIG_DIR)
        save_checkpoint(root, step, self.chunks, self.optimizer, self.scheduler, extra, keep_last)

    def load(self, root: Path) -> dict | None:
        """Resume from the newest checkpoint under `root`: its `extra`, or None if none."""
        return load_checkpoint(root, self.chunks, self.optimizer, self.scheduler)

    def export_hf(self, hf_dir: Path) -> Path:
        return save_hf_checkpoint(self.chunks, self.spec, hf_dir, self.recipe.model.hf_path)

    def close(self) -> None:
        teardown_parallel()
