"""The loop's serving side: rollout engine, domain teachers and weight sync, started together.

Owned by global rank 0. The rollout engine serves the student (its HF folder at start, then
the weights pushed after every step); each teacher serves its own folder. `rollout.engine:
local` runs the embedded CPU engine, `sglang` launches SGLang servers, `url` attaches to
running ones; nothing else in the loop changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .collect import evaluate_engine
from .config import Recipe, RecipeError, RolloutConfig, teacher_payload
from .data import PromptRecord
from .envs.environment import environment_names
from .hf.spec import read_hf_config
from .rollout.client import EngineClient
from .rollout.multi_turn import DEFAULT_LIMITS, EpisodeLimits
from .rollout.sglang import start_engine
from .rollout.transport import run_sync
from .rollout.types import RouteShape
from .sync import make_weight_sync
from .teachers import TeacherPool

STARTUP_TIMEOUT_S = 900.0


@dataclass
class Serving:
    rollout: EngineClient
    teachers: TeacherPool
    weight_sync: object
    """Has `push(buckets, weight_version)` (tensor, disk or distributed sync)."""
    routes: RouteShape | None = None
    """The routes the rollout engine returns with every sample (routing replay), or None."""
    episodes: EpisodeLimits = DEFAULT_LIMITS
    """Turn and token budgets of multi-turn prompts (evaluated as greedy episodes)."""

    def evaluate(self, tokenizer, records, max_new_tokens: int) -> dict[str, float] | None:
        """Greedy held-out accuracy per domain of the rollout engine's current weights."""
        if not records:
            return None
        return run_sync(evaluate_engine(self.rollout, tokenizer, records, max_new_tokens,
                                        self.episodes))

    def evaluate_teachers(self, tokenizer, records, max_new_tokens: int) -> dict[str, dict]:
        """Each teacher's greedy accuracy on the held-out prompts of the domains it serves."""
        scores = {}
        for name in self.teachers.names:
            own = [r for r in records if self.teachers.route(r.domain) == name]
            client = self.teachers.client(name)
            scores[name] = run_sync(evaluate_engine(client, tokenizer, own, max_new_tokens,
                                                    self.episodes))
        return scores


class NoServing:
    """The serving side on ranks that own no engine (and in `--train-only` runs): nothing to
    call, nothing to evaluate, so the loop runs the same code on every rank."""

    rollout = teachers = weight_sync = routes = None

    def evaluate(self, tokenizer, records, max_new_tokens: int) -> None:
        return None

    def evaluate_teachers(self, tokenizer, records, max_new_tokens: int) -> dict:
        return {}


def replayed_routes(recipe: Recipe) -> RouteShape | None:
    """The shape of the routes the rollout engine must return: routing replay is on and the
    student is MoE (a dense model has no routes), the same rule as the trainer's."""
    spec = read_hf_config(recipe.model.hf_path)
    if not (recipe.rollout.routing_replay and spec.is_moe):
        return None
    return RouteShape(spec.num_layers, spec.num_experts_per_tok, spec.num_experts)


def rollout_config(recipe: Recipe, routes: RouteShape | None) -> RolloutConfig:
    """The rollout engine's settings: it records routes only when they are replayed."""
    return dataclasses.replace(recipe.rollout, routing_replay=routes is not None)


def prepare_environments(recipe: Recipe, records: list[PromptRecord]) -> None:
    """Import `rollout.environment_modules` (they register environments) and check, before
    any engine starts, that every environment the records name is registered and that the
    recipe can run episodes: on-policy, a payload for multi-turn, an episode that fits the
    student's context (the teachers prefill the whole episode)."""
    cfg, src = recipe.rollout, recipe.source
    for module in cfg.environment_modules:
        importlib.import_module(module)
    named = sorted({r.environment for r in records if r.environment})
    if unknown := sorted(set(named) - set(environment_names())):
        raise RecipeError(f"{src}: prompt records name environment(s) {unknown} that no module "
                          f"in rollout.environment_modules={cfg.environment_modules} registers "
                          f"(registered: {environment_names()})")
    if not named:
        return
    if cfg.source == "teacher_samples":
        raise RecipeError(f"{src}: rollout.source=teacher_samples samples single turns; the "
                          f"records name environment(s) {named} (multi-turn): use on_policy")
    if teacher_payload(recipe) == "student_topk":
        raise RecipeError(f"{src}: teachers[].payload=student_topk needs single-turn records; "
                          f"the records name environment(s) {named}: use payload topk")
    context = read_hf_config(recipe.model.hf_path).max_position_embeddings
    if cfg.max_episode_tokens >= context:
        raise RecipeError(f"{src}: rollout.max_episode_tokens={cfg.max_episode_tokens} must be "
                          f"below the student's context length, max_position_embeddings="
                          f"{context} in {Path(recipe.model.hf_path) / 'config.json'}: an "
                          "engine refuses an input that fills the whole context")


@contextmanager
def start_serving(recipe: Recipe, run_dir: Path, owner: bool = True):
    """Start (or attach to) every engine the recipe names; stop them all on exit.

    Args:
        recipe: the run's recipe (rollout engine, teachers, weight sync).
        run_dir: the engines' logs go to `<run_dir>/logs`.
        owner: whether this process owns the engines (global rank 0); others get `NoServing`.
    """
    if not owner:
        yield NoServing()
        return
    log_dir = Path(run_dir) / "logs"
    routes = replayed_routes(recipe)
    with ExitStack() as stack:
        # The rollout engine starts while the teachers start; both are healthy past this block.
        rollout = stack.enter_context(
            start_engine(rollout_config(recipe, routes), recipe.model.hf_path, log_dir,
                         name="rollout", wait=False)
        )
        teachers = stack.enter_context(
            TeacherPool.start(recipe.teachers, recipe.model.hf_path, log_dir)
        )
        rollout.wait_healthy(STARTUP_TIMEOUT_S)
        sync = make_weight_sync(
            recipe.rollout, rollout.client, template_dir=recipe.model.hf_path, work_dir=run_dir,
            # The distributed path's rendezvous is on the student's first node.
            master_address=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=recipe.launch.ports.weight_sync,
        )
        yield Serving(rollout.client, teachers, sync, routes,
                      EpisodeLimits.from_config(recipe.rollout))
