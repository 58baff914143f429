"""Where each step's trajectories come from, behind one interface (`next(step)`).

- `OnPolicySource`: this step's prompts, sampled by the rollout engine with the student's
  current weights, scored by the domain teachers and verifiers (`collect.py`).
- `SavedTrajectories`: the trajectories a `--rollout-only` run dumped, replayed step by step
  (`--train-only`: debug the trainer without engines, as slime's debug switches do).

A source is collective: every rank calls `next(step)` and gets the same list. Only global rank
0 talks to the engines; it broadcasts the result, so the loop never branches on the rank.
Dumps are one JSON-lines file per step, `<dir>/step_0000001.jsonl`, one trajectory a line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import AutoTokenizer

from .collect import RolloutSettings, collect_trajectories
from .config import Recipe, teacher_payload
from .data import DomainMixSampler
from .data.prompt_set import load_prompt_set
from .hf.spec import read_hf_config
from .mopd.objectives import LossContext, RolloutNeeds, build_objective
from .rollout.multi_turn import EpisodeLimits
from .rollout.transport import run_sync
from .rollout.types import SamplingParams
from .serving import prepare_environments, start_serving
from .trajectory import Trajectory


def broadcast_from_leader(obj: Any) -> Any:
    """A picklable object from global rank 0 to every rank (a no-op in a lone process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def step_sampling(recipe: Recipe, step: int) -> SamplingParams:
    """The rollout's sampling parameters, seeded per step so a resumed run draws the same."""
    r = recipe.rollout
    return SamplingParams(r.temperature, r.top_p, r.top_k, r.max_new_tokens,
                          sampling_seed=(recipe.train.seed << 40) + (step << 20))


class OnPolicySource:
    """Samples, scores and verifies this step's prompts (engines on rank 0 only).

    Args:
        serving: the `Serving` of rank 0 (engines, teachers), or `NoServing` elsewhere.
        tokenizer: the student's tokenizer (the verifiers read decoded text).
        sampler: the prompt sampler; `next` advances it on every rank (under
            `async_rollout` only rank 0's producer draws, and checkpoints carry its state).
        recipe: the run's recipe (rollout settings, seed).
        needs: what the objective asks of the teachers.
    """

    def __init__(self, serving, tokenizer, sampler: DomainMixSampler, recipe: Recipe,
                 needs: RolloutNeeds):
        self.serving, self.tokenizer, self.sampler = serving, tokenizer, sampler
        self.recipe, self.needs = recipe, needs

    def next(self, step: int) -> list[Trajectory]:
        records = self.sampler.next_batch()
        collected = self.collect(step, records) if self.serving.rollout is not None else None
        return broadcast_from_leader(collected)

    def collect(self, step: int, records) -> list[Trajectory]:
        """Sample `records` with step `step`'s seed, score and verify them (rank 0 only: no
        collective, so `async_rollout`'s producer thread calls it too)."""
        r = self.recipe.rollout
        settings = RolloutSettings(
            sampling=step_sampling(self.recipe, step),
            n_samples_per_prompt=r.n_samples_per_prompt, chunk_size=r.batch_size,
            teacher_top_k=self.needs.teacher_top_k, student_top_k=self.needs.student_top_k,
            teacher_hidden_states=self.needs.teacher_hidden_states,
            use_teachers=self.needs.queries_teachers, routes=self.serving.routes,
            episodes=EpisodeLimits.from_config(r),
        )
        return run_sync(collect_trajectories(
            self.serving.rollout, self.serving.teachers, self.tokenizer, records, settings))


class SavedTrajectories:
    """Replays dumped trajectories: step s reads `<dir>/step_<s>.jsonl` (every rank)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: no folder of saved trajectories "
                                    f"(write one with `train RECIPE --rollout-only DIR`)")

    def next(self, step: int) -> list[Trajectory]:
        path = dump_path(self.directory, step)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no saved trajectories for step {step}")
        lines = path.read_text().splitlines()
        return [Trajectory.from_json(json.loads(line)) for line in lines if line.strip()]


def rollout_only(recipe: Recipe, out_dir: str | Path) -> Path:
    """Sample and score `train.steps` steps with the initial weights and dump them (no
    Megatron): the `--rollout-only` debug switch; `--train-only` trains on the dump."""
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.hf_path)
    prompts = load_prompt_set(recipe.data, tokenizer, recipe.train.seed)
    prepare_environments(recipe, prompts.train + prompts.held_out)
    vocab = read_hf_config(recipe.model.hf_path).vocab_size
    ctx = LossContext(vocab_size=vocab, teacher_payload=teacher_payload(recipe))
    needs = build_objective(recipe.algorithm, ctx).needs
    with start_serving(recipe, Path(out_dir)) as serving:
        source = OnPolicySource(serving, tokenizer, prompts.sampler, recipe, needs)
        for step in range(1, recipe.train.steps + 1):
            path = dump_trajectories(Path(out_dir), step, source.next(step))
            print(f"rollout-only: step {step}/{recipe.train.steps} -> {path}", flush=True)
    return Path(out_dir)


def dump_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:07d}.jsonl"


def dump_trajectories(directory: Path, step: int, trajectories: list[Trajectory]) -> Path:
    """Write one step's trajectories as JSON lines (what `SavedTrajectories` reads)."""
    path = dump_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps(t.to_json(), allow_nan=True) for t in trajectories)
    path.write_text("".join(f"{line}\n" for line in lines))
    return path
