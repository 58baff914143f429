"""Rollout ahead of training with bounded staleness (`rollout.max_staleness`, `stale_policy`).

A producer thread on global rank 0 samples, scores and verifies the batches of the next steps
(`OnPolicySource.collect`) with the newest weights the rollout engine has, while every rank
trains on earlier batches; `next(step)` hands rank 0's batch to every rank by broadcast, once
per step on every rank, so the collective schedule does not depend on timing.

Versions. The engine's weight version v is the number of optimizer steps in its weights: the
loop pushes `str(step)` after step `step`; the HF weights it starts from are version 0
(SGLang and the embedded engine call them "default"). The trainer holds version s − 1 when it
trains step s, so a batch sampled by version v has staleness s − 1 − v at step s. Every
trajectory carries the version the engine reported (`/model_info`, asked before and after its
batch: a weight update never lands while a batch is in flight, see below).

Weight updates while generation runs: the loop pushes weights, probes the engine and
evaluates inside `engine_turn(step)`. The turn starts once the in-flight batch has finished
(SGLang's "let in-flight requests finish and tag them with their version") and no batch
starts until it ends, so no batch mixes two versions and no trainer request is merged into a
rollout batch (the embedded engine pads merged requests together, which moves the last bits).

The bound k = `max_staleness`, as `stale_policy` says:
- `wait` (default): batch s is sampled by exactly version max(0, s − 1 − k). The producer
  starts batch s once the engine holds version s − 1 − k; the turn of step s waits for batch
  min(s + k, steps). Both sides wait on each other by step number, never by timing, so a run
  is reproducible and resumes exactly; k = 0 is the synchronous loop. Staleness min(s − 1, k).
- `drop`: the producer never waits for the trainer, only for room (k + 1 ready batches) and
  for the turns; the trainer drops (and counts) a batch older than the bound and takes the
  next. More of a slow trainer's time is overlapped, and samples are wasted; which batches
  are dropped depends on timing, so a resumed run is not bit-identical.

Checkpoints: `state_dict()` holds the ready batches (as `Trajectory.to_json`) and the prompt
sampler's position after the last of them; the batch in flight is dropped and redrawn on
resume with the same prompts, seed and (under `wait`) version, so resuming trains on exactly
what the original run trained on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Self

from .config import RolloutConfig
from .sources import OnPolicySource, broadcast_from_leader
from .trajectory import Trajectory

INITIAL_VERSIONS = (None, "", "default")
"""What engines report for the weights they started from (version 0)."""


class StalenessError(RuntimeError):
    """The producer and the trainer disagree about versions (a bug, or a foreign update)."""


@dataclass
class ReadyBatch:
    """One produced step's trajectories and how they were made (rank 0)."""

    index: int
    """Produced batches are numbered 1, 2, ...; the sampling seed is the index's."""
    trajectories: list[Trajectory]
    version: int
    """The weight version that sampled every trajectory of the batch."""
    sampler: dict
    """The prompt sampler's state right after this batch's prompts were drawn."""
    seconds: float = 0.0
    """Generation, teacher scoring and verification of the batch."""
    producer_wait: float = 0.0
    """What the producer waited (for weights, room or a turn) before starting it."""

    def to_state(self) -> dict:
        return {"index": self.index, "version": self.version, "sampler": self.sampler,
                "trajectories": [t.to_json() for t in self.trajectories]}

    @classmethod
    def from_state(cls, state: dict) -> ReadyBatch:
        trajectories = [Trajectory.from_json(t) for t in state["trajectories"]]
        return cls(state["index"], trajectories, state["version"], state["sampler"])


def engine_version(reported: str | None) -> int:
    """The step count in an engine's reported weight version (see the module docstring)."""
    if reported in INITIAL_VERSIONS:
        return 0
    if not str(reported).isdigit():
        raise StalenessError(f"the rollout engine reports weight version {reported!r}; the "
                             "trainer pushes step numbers (another writer updated it?)")
    return int(reported)


class AsyncSource:
    """On-policy batches produced ahead of training, at most `max_staleness` steps stale.

    Args:
        inner: the on-policy source whose `collect(step, records)` makes one batch (rank 0).
        rollout: `max_staleness` and `stale_policy`.
        steps: the run's last step (the `wait` producer makes no batch past it).
        start_step: the step the run starts after (a resumed checkpoint's, else 0); the
            engine then holds version `start_step`.
        state: a checkpoint's `state_dict()`, or None.
        leader: whether this rank owns the engines (global rank 0).

    Use as a context manager: the producer starts on entry and stops on exit.
    """

    def __init__(self, inner: OnPolicySource, rollout: RolloutConfig, steps: int, *,
                 start_step: int = 0, state: dict | None = None, leader: bool = True):
        self.inner, self.k, self.policy = inner, rollout.max_staleness, rollout.stale_policy
        self.steps, self.leader = steps, leader
        self._cond = threading.Condition()
        self._version = start_step
        self._ready: deque[ReadyBatch] = deque()
        self._next_index = start_step + 1
        self._sampler = inner.sampler.state_dict()
        if state is not None:
            self._ready.extend(ReadyBatch.from_state(b) for b in state["ready"])
            self._next_index, self._sampler = state["next_index"], state["sampler"]
            inner.sampler.load_state_dict(self._sampler)
        self._busy = self._turn = self._stop = False
        self._error: BaseException | None = None
        self.dropped = state["dropped"] if state is not None else 0
        self._trainer_wait = 0.0
        self._last: ReadyBatch | None = None
        self._thread = threading.Thread(target=self._produce, daemon=True, name="rollout-ahead")

    def __enter__(self) -> Self:
        if self.leader:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the producer once its batch in flight is done (nothing is left running)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # -- trainer side (every rank calls these together) ------------------------------------

    def next(self, step: int) -> list[Trajectory]:
        """The batch to train step `step` on (rank 0 may wait for it, or drop stale ones)."""
        batch = self._take(step) if self.leader else None
        return broadcast_from_leader(batch.trajectories if batch else None)

    @contextmanager
    def engine_turn(self, step: int):
        """The trainer's use of the rollout engine after step `step` (push, probe, evaluate):
        it starts once no batch is in flight (under `wait`, once batch min(step + k, steps)
        is made), and the engine holds version `step` when it ends."""
        if not self.leader:
            yield
            return
        started = time.perf_counter()
        with self._cond:
            last = min(step + self.k, self.steps)
            self._wait(lambda: self.policy == "drop" or self._next_index > last)
            self._turn = True
            self._wait(lambda: not self._busy)
        self._trainer_wait += time.perf_counter() - started
        try:
            yield
        finally:
            with self._cond:
                self._version, self._turn = step, False
                self._cond.notify_all()

    def scalars(self, step: int) -> dict[str, float]:
        """The step's staleness, both sides' waits and the producer's throughput (rank 0)."""
        batch = self._last
        if batch is None:
            return {}
        generated = sum(t.num_generated for t in batch.trajectories)
        out = {"async/staleness": float(step - 1 - batch.version),
               "async/trainer_wait_s": self._trainer_wait,
               "async/producer_wait_s": batch.producer_wait,
               "async/ready_batches": float(len(self._ready)),
               "async/dropped_batches": float(self.dropped),
               "time/generate": batch.seconds,
               # time/rollout is the trainer's wait here; the engine's rate is the producer's
               "throughput/generated_tokens_per_s": generated / max(batch.seconds, 1e-9)}
        self._trainer_wait = 0.0
        return out

    def state_dict(self) -> dict:
        """Ready batches and the sampler after them, the same on every rank (collective)."""
        state = None
        if self.leader:
            with self._cond:
                state = {"ready": [b.to_state() for b in self._ready], "sampler": self._sampler,
                         "next_index": self._next_index, "dropped": self.dropped}
        return broadcast_from_leader(state)

    # -- rank 0 ------------------------------------------------------------------------------

    def _wait(self, ready) -> None:
        """Wait (holding the lock) for `ready()`; a failed producer's error surfaces here."""
        self._cond.wait_for(lambda: self._error is not None or ready())
        if self._error is not None:
            raise StalenessError("the rollout producer failed") from self._error

    def _take(self, step: int) -> ReadyBatch:
        started = time.perf_counter()
        with self._cond:
            while True:
                self._wait(lambda: bool(self._ready))
                batch = self._ready.popleft()
                self._cond.notify_all()
                if step - 1 - batch.version <= self.k:
                    break
                if self.policy == "wait":
                    raise StalenessError(f"step {step}: batch {batch.index} was sampled by "
                                         f"version {batch.version}, over the bound {self.k}")
                self.dropped += 1
        if self.policy == "wait" and batch.index != step:
            raise StalenessError(f"step {step} got batch {batch.index}")
        self._trainer_wait += time.perf_counter() - started
        self._last = batch
        return batch

    def _may_start(self, index: int) -> bool:
        if self._turn:
            return False
        if self.policy == "wait":
            return index <= self.steps and self._version >= index - 1 - self.k
        return len(self._ready) <= self.k

    def _produce(self) -> None:
        try:
            while True:
                started = time.perf_counter()
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or self._may_start(self._next_index))
                    if self._stop:
                        return
                    self._busy, index, version = True, self._next_index, self._version
                waited = time.perf_counter() - started
                batch = self._make(index, version)
                batch.producer_wait = waited
                with self._cond:
                    self._ready.append(batch)
                    self._sampler, self._next_index, self._busy = batch.sampler, index + 1, False
                    self._cond.notify_all()
        except BaseException as err:  # noqa: BLE001 - handed to the trainer's next wait
            with self._cond:
                self._error, self._busy = err, False
                self._cond.notify_all()

    def _make(self, index: int, version: int) -> ReadyBatch:
        """Draw, sample and score batch `index`, checking the engine's version around it."""
        engine = self.inner.serving.rollout
        before = engine.model_info().get("weight_version")
        records = self.inner.sampler.next_batch()
        sampler = self.inner.sampler.state_dict()
        started = time.perf_counter()
        trajectories = self.inner.collect(index, records)
        seconds = time.perf_counter() - started
        after = engine.model_info().get("weight_version")
        if before != after or engine_version(after) != version:
            raise StalenessError(f"batch {index}: the engine's weight version went from "
                                 f"{before!r} to {after!r}, expected {version}")
        for traj in trajectories:
            traj.weight_version = version
        return ReadyBatch(index, trajectories, version, sampler, seconds)
