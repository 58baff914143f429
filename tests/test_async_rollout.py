"""Rollout ahead of training (`async_rollout.py`) against the synchronous schedule.

The schedule tests run the producer on real embedded engines (rollout + two teachers over
HTTP) with a stand-in trainer that pushes a different real checkpoint after every step, so
each weight version samples different tokens. The reference is `OnPolicySource` called step
by step with the engine holding the version the bound names: under `stale_policy: wait`,
batch s must equal, bit for bit, the reference batch s sampled by version max(0, s − 1 − k),
whatever the delays on either side. At k = 0 the trainer then sees exactly the synchronous
loop's batches, so its losses and weights are the synchronous loop's: the Megatron step is
unchanged, and every on-policy loop of `test_train_loop.py` runs through the producer at
k = 0. The loop test here kills a staleness-1 run of the full Megatron loop and resumes it.
"""

import json
import re
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from test_train_loop import (  # noqa: F401 - world is a fixture
    _env,
    _train_command,
    assert_resumes_exactly,
    world,
)
from transformers import AutoTokenizer

from mopd_megatron.async_rollout import AsyncSource
from mopd_megatron.config import Recipe, RecipeError, edit_recipe, load_recipe
from mopd_megatron.data.prompt_set import load_prompt_set
from mopd_megatron.mopd.objectives import LossContext, build_objective
from mopd_megatron.plan.planner import make_plan
from mopd_megatron.plan.timing import step_times
from mopd_megatron.serving import Serving, start_serving
from mopd_megatron.sources import OnPolicySource

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
STEPS = 4


class Engines(NamedTuple):
    recipe: Recipe
    serving: Serving
    tokenizer: object
    root: Path
    """The test world: the student's and the teachers' HF folders, the prompts."""


@pytest.fixture(scope="module")
def engines(world, tmp_path_factory):  # noqa: F811 - the imported fixture
    """Started engines, the recipe and a tokenizer; versions 1.. push other checkpoints."""
    run = tmp_path_factory.mktemp("async") / "run"
    recipe = load_recipe(_train_command(world, run, steps=STEPS)[-1])  # writes the recipe
    with start_serving(recipe, run) as serving:
        yield Engines(recipe, serving, AutoTokenizer.from_pretrained(recipe.model.hf_path), world)


def _set_version(engines: Engines, version: int) -> None:
    """Give the rollout engine the weights of `version`: the student's HF folder at 0, then
    other real models of the same architecture, so that every version samples differently."""
    root = engines.root
    cycle = [root / "student", root / "teacher_add", root / "teacher_rev"]
    engines.serving.rollout.update_weights_from_disk(str(cycle[version % len(cycle)]),
                                                     weight_version=str(version))


class SlowEngine(OnPolicySource):
    """The real source with a slow engine: every batch takes `delay` longer."""

    delay = 0.0

    def collect(self, step, records):
        time.sleep(self.delay)
        return super().collect(step, records)


def _source(engines: Engines, engine_delay=0.0) -> SlowEngine:
    """A fresh source (sampler at the start) on an engine holding version 0, and teachers
    with empty prefix caches (a cached prefix is computed in another batch shape, which moves
    the last bits of the teachers' log-probs)."""
    recipe, tokenizer = engines.recipe, engines.tokenizer
    for name in engines.serving.teachers.names:
        engines.serving.teachers.client(name).flush_cache()
    prompts = load_prompt_set(recipe.data, tokenizer, recipe.train.seed)
    needs = build_objective(recipe.algorithm, LossContext(vocab_size=tokenizer.vocab_size)).needs
    _set_version(engines, 0)
    source = SlowEngine(engines.serving, tokenizer, prompts.sampler, recipe, needs)
    source.delay = engine_delay
    return source


def _reference(engines, k: int) -> tuple[list[list], float]:
    """Batches 1..STEPS, batch s sampled by version max(0, s − 1 − k), one after the other,
    and the injected delay that makes a side slow here: twice the slowest batch, plus 0.2 s
    (on a loaded machine a batch takes from 0.2 s to over 1 s)."""
    source, held = _source(engines), 0
    batches, slowest = [], 0.0
    for step in range(1, STEPS + 1):
        version = max(0, step - 1 - k)
        if version != held:
            _set_version(engines, version)
            held = version
        started = time.perf_counter()
        batches.append(source.next(step))
        slowest = max(slowest, time.perf_counter() - started)
    return batches, 2 * slowest + 0.2


def _run_async(engines, k: int, policy="wait", trainer_delay=0.0, engine_delay=0.0):
    """The producer under a stand-in trainer: (batches, each step's async scalars, dropped)."""
    recipe = edit_recipe(engines.recipe, rollout={"max_staleness": k, "stale_policy": policy})
    batches, scalars = [], []
    with AsyncSource(_source(engines, engine_delay), recipe.rollout, STEPS) as ahead:
        for step in range(1, STEPS + 1):
            batches.append(ahead.next(step))
            time.sleep(trainer_delay)  # the Megatron step
            with ahead.engine_turn(step):
                _set_version(engines, step)
            scalars.append(ahead.scalars(step))
        dropped = ahead.dropped
    return batches, scalars, dropped


def _plain(batch) -> list[dict]:
    """Everything a trajectory holds but its version tag."""
    return [{**t.to_json(), "weight_version": None} for t in batch]


def test_staleness_zero_is_the_synchronous_loop(engines):
    expected, _ = _reference(engines, k=0)
    got, scalars, _ = _run_async(engines, k=0)
    assert [_plain(b) for b in got] == [_plain(b) for b in expected]
    assert [{t.weight_version for t in b} for b in got] == [{0}, {1}, {2}, {3}]
    assert [s["async/staleness"] for s in scalars] == [0.0] * STEPS


@pytest.mark.parametrize("slow", ["trainer", "engine"])
def test_wait_policy_holds_the_bound_exactly(engines, slow):
    """Staleness 1 with either side slow: every batch is sampled by exactly the version the
    bound names (so it equals the synchronous schedule's batch at that version), and the
    fast side is the one that waits."""
    expected, delay = _reference(engines, k=1)
    delays = {"trainer_delay": delay} if slow == "trainer" else {"engine_delay": delay}
    got, scalars, dropped = _run_async(engines, k=1, **delays)
    assert [_plain(b) for b in got] == [_plain(b) for b in expected]
    assert [{t.weight_version for t in b} for b in got] == [{0}, {0}, {1}, {2}]
    assert [s["async/staleness"] for s in scalars] == [0.0, 1.0, 1.0, 1.0]
    assert dropped == 0
    # Past step 1 (which waits for the first batch either way) the fast side does the waiting.
    producer = sum(s["async/producer_wait_s"] for s in scalars)
    trainer = sum(s["async/trainer_wait_s"] for s in scalars[1:])
    fast, slow_side = (producer, trainer) if slow == "trainer" else (trainer, producer)
    assert fast > delay / 2 > slow_side


def test_drop_policy_drops_and_counts_what_is_too_stale(engines):
    """With a slow trainer the drop producer runs ahead and its oldest batches age past the
    bound: they are dropped and counted, and no trained batch is older than the bound."""
    _, delay = _reference(engines, k=1)
    got, scalars, dropped = _run_async(engines, k=1, policy="drop", trainer_delay=delay)
    for step, batch in enumerate(got, start=1):
        assert all(step - 1 - t.weight_version <= 1 for t in batch)
    assert [s["async/staleness"] for s in scalars] == [
        step - 1 - got[step - 1][0].weight_version for step in range(1, STEPS + 1)]
    assert dropped > 0 and scalars[-1]["async/dropped_batches"] == dropped


def test_killed_staleness_one_run_resumes_exactly(world, tmp_path):  # noqa: F811
    """Kill the full loop at staleness 1 after a checkpoint; the resumed run restores the
    batches sampled ahead and trains on what the uninterrupted run trained on."""
    extra = ["rollout.max_staleness=1", "checkpoint.export_hf=false", "data.eval_files=[]"]
    reference = tmp_path / "reference"
    subprocess.run(_train_command(world, reference) + extra, env=_env(), check=True,
                   timeout=300)
    assert _staleness(reference) == [0.0, 1.0, 1.0, 1.0]

    run = tmp_path / "killed"
    assert_resumes_exactly(_train_command(world, run) + extra, run, reference, steps=STEPS)


def _staleness(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [row["async/staleness"] for row in rows]


@pytest.mark.parametrize("override, key", [("rollout.max_staleness=-1", "rollout.max_staleness"),
                                           ("rollout.stale_policy=drop", "rollout.stale_policy")])
def test_bad_staleness_settings_name_the_key(world, tmp_path, override, key):  # noqa: F811
    recipe = _train_command(world, tmp_path / "run")[-1]
    with pytest.raises(RecipeError, match=re.escape(f"'{key}'")):
        load_recipe(recipe, [override])


def test_planner_idle_time_sync_and_ahead():
    """The Qwen3-30B-A3B recipe's modelled step: running the rollout ahead never adds idle
    time, and the shorter the responses (the less the rollout dominates), the more it saves."""
    recipe = RECIPES / "qwen3_30b_a3b_mopd.yaml"
    gains = []
    for tokens in (28672, 2048):
        times = step_times(make_plan(load_recipe(recipe, [f"rollout.max_new_tokens={tokens}"])))
        sync, ahead = times.idle(ahead=False), times.idle(ahead=True)
        assert all(0 <= ahead[g] <= sync[g] for g in sync)
        assert min(ahead.values()) == 0  # the slowest group never waits
        gains.append(times.step(ahead=False) / times.step(ahead=True))
    assert 1 < gains[0] < gains[1]
