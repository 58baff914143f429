"""Rollout stage, embedded CPU engine scheduling: one worker thread, SGLang's pause and abort.

Consumes `/generate` samples and control jobs (weight updates, cache flushes) from the HTTP
threads; produces their results, in arrival order. One worker thread takes the queue in
order: consecutive /generate jobs are merged into one model batch of at most `max_batch`
samples (`local_batch.BatchRunner.run`); any other job runs alone, between batches.

SGLang 0.5.23's control of in-flight generation:
- `abort(rid, abort_all)` (/abort_request): queued samples whose rid starts with `rid` (or
  all) finish at once with finish_reason abort; running ones at their next decode step.
- `pause(mode)` (/pause_generation): new and queued /generate jobs wait for `resume()`
  (/continue_generation). Mode `abort` (SGLang's default) first aborts everything and waits
  until no batch runs; `in_place` stops the running batch before its next step, keeping its
  KV, and runs control jobs meanwhile (a weight update while generation is in flight);
  `retract` (recompute the running requests after resuming) is not implemented.
- `idle()`: no batch runs (SGLang refuses to flush its cache or release memory otherwise).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from mopd_megatron.rollout.local_batch import BatchRunner
from mopd_megatron.rollout.local_requests import BadRequest, SeqRequest


@dataclass(eq=False)
class _Job:
    seqs: list[SeqRequest] | None = None
    """Samples to generate, or None for a control job."""
    call: Callable[[], Any] | None = None
    future: Future = field(default_factory=Future)


class Scheduler:
    """The engine's worker thread and its queue.

    Args:
        runner: Runs a batch of samples.
        max_batch: Most samples in one model batch (SGLang's --max-running-requests).
    """

    def __init__(self, runner: BatchRunner, max_batch: int):
        self.runner, self.max_batch = runner, max_batch
        self.paused = False
        self._jobs: deque[_Job] = deque()
        self._running: list[SeqRequest] = []
        self._aborts = self._aborts_seen = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="scheduler").start()

    def generate(self, seqs: list[SeqRequest]) -> list[dict]:
        """Queue samples and wait for their results."""
        return self._submit(_Job(seqs=seqs))

    def control(self, call: Callable[[], Any]) -> Any:
        """Run `call` on the worker thread between batches (or while paused in place)."""
        return self._submit(_Job(call=call))

    def idle(self) -> bool:
        """No batch is running (paused in place counts as running)."""
        return not self._running

    def counts(self) -> dict[str, int]:
        """Running and queued samples."""
        with self._cond:
            waiting = sum(len(job.seqs) for job in self._jobs if job.seqs is not None)
            return {"num_running_reqs": len(self._running), "num_waiting_reqs": waiting}

    def abort(self, rid: str = "", abort_all: bool = False) -> None:
        """SGLang's abort_request: match by rid prefix, or everything."""
        if not abort_all and not rid:
            return  # SGLang ignores an empty rid (it would match every request)
        with self._cond:
            for r in self._running:
                if abort_all or r.rid.startswith(rid):
                    r.aborted = r.aborted or "Aborted"
            for job in [job for job in self._jobs if job.seqs is not None]:
                for r in job.seqs:
                    if abort_all or r.rid.startswith(rid):
                        r.aborted = r.aborted or "Abort in waiting queue"
                if all(r.aborted for r in job.seqs):
                    self._jobs.remove(job)
                    job.future.set_result([self.runner.result(r) for r in job.seqs])
            self._aborts += 1
            self._cond.notify_all()

    def pause(self, mode: str = "abort") -> None:
        """SGLang's pause_generation (modes 'abort' and 'in_place')."""
        if mode not in ("abort", "in_place"):
            raise BadRequest(f"pause_generation mode {mode!r} is not supported by the embedded "
                             "CPU engine (use 'abort' or 'in_place')")
        with self._cond:
            self.paused = True
        if mode == "abort":
            self.abort(abort_all=True)
            with self._cond:
                self._cond.wait_for(self.idle)

    def resume(self) -> None:
        """SGLang's continue_generation."""
        with self._cond:
            self.paused = False
            self._cond.notify_all()

    # -- worker ---------------------------------------------------------------------------

    def _submit(self, job: _Job) -> Any:
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()
        return job.future.result()

    def _pop_control(self) -> _Job | None:
        job = next((job for job in self._jobs if job.seqs is None), None)
        if job is not None:
            self._jobs.remove(job)
        return job

    def _take(self) -> list[_Job] | None:
        """The next work (under the lock): a control job, or merged /generate jobs."""
        if self.paused or not self._jobs:
            job = self._pop_control()
            return None if job is None else [job]
        jobs = [self._jobs.popleft()]
        size = len(jobs[0].seqs) if jobs[0].seqs is not None else 0
        while (size and self._jobs and self._jobs[0].seqs is not None
               and size + len(self._jobs[0].seqs) <= self.max_batch):
            size += len(self._jobs[0].seqs)
            jobs.append(self._jobs.popleft())
        return jobs

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (jobs := self._take()) is None:
                    self._cond.wait()
                if jobs[0].seqs is not None:
                    self._running = [r for job in jobs for r in job.seqs]
            if jobs[0].seqs is None:
                _run_control(jobs[0])
                continue
            try:
                results = self.runner.run(self._running, self._between_steps)
                for job in jobs:
                    job.future.set_result(results[:len(job.seqs)])
                    results = results[len(job.seqs):]
            except Exception as err:  # noqa: BLE001 - every waiting request gets the error
                for job in jobs:
                    job.future.set_exception(err)
            with self._cond:
                self._running = []
                self._cond.notify_all()

    def _between_steps(self) -> bool:
        """The engine's hook before each decode step: hold while paused, running control jobs;
        return early (False) when an abort arrives so the engine can finish aborted rows."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: not self.paused or self._aborts != self._aborts_seen
                                    or any(job.seqs is None for job in self._jobs))
                if not self.paused or self._aborts != self._aborts_seen:
                    self._aborts_seen = self._aborts
                    return not self.paused
                job = self._pop_control()
            _run_control(job)


def _run_control(job: _Job) -> None:
    try:
        job.future.set_result(job.call())
    except Exception as err:  # noqa: BLE001 - handed to the waiting request
        job.future.set_exception(err)
