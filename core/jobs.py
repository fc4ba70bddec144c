"""JobRunner: one job at a time on a worker thread, a queue behind it, a stop flag each.

The engine sees only a JobContext; watchers read a Job's snapshot, which survives page reloads
because it lives here and not in any browser session. With `worker_process`, a job whose work is
a ProcessTask (training) runs in a long-lived worker process (core/worker_process.py) and its
events are relayed into the same Job; other jobs run on the thread as before."""
from __future__ import annotations

import itertools
import json
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core import events as ev
from core.paths import Paths
from core.worker_process import ProcessTask, WorkerProcess, wanted

QUEUED, RUNNING, DONE, STOPPED, FAILED = "queued", "running", "done", "stopped", "failed"


class Busy(RuntimeError):
    """Raised when a job is submitted while another runs and queueing was not asked for."""


class JobContext:
    def __init__(self, job: "Job", paths: Paths):
        self.job = job
        self.paths = paths

    def emit(self, event: ev.Event) -> None:
        self.job.record(event)

    def should_stop(self) -> bool:
        return self.job.stop_event.is_set()


@dataclass
class Job:
    id: int
    name: str
    kind: str
    fn: Callable[[JobContext], Any]
    config: Any = None
    spec: dict | None = None  # how to rebuild the job after a restart (kept in the queue file)
    state: str = QUEUED
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    losses: list = field(default_factory=list)  # (step, loss, learn_rate)
    validation: list = field(default_factory=list)  # (step, held-out loss)
    previews: list = field(default_factory=list)  # ev.Preview
    saved: list = field(default_factory=list)  # ev.Saved
    log: deque = field(default_factory=lambda: deque(maxlen=200))
    last_progress: ev.Progress | None = None
    result: ev.Finished | ev.Failed | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, event: ev.Event) -> None:
        with self._lock:
            if isinstance(event, ev.Progress):
                self.last_progress = event
                self.losses.append((event.step, event.loss, event.learn_rate))
                if event.validation_loss is not None:
                    self.validation.append((event.step, event.validation_loss))
            elif isinstance(event, ev.Preview):
                self.previews.append(event)
            elif isinstance(event, ev.Saved):
                self.saved.append(event)
                self.log.append(f"saved {event.kind}: {event.path}")
            elif isinstance(event, ev.Status):
                self.log.append(event.text)
            elif isinstance(event, (ev.Finished, ev.Failed)):
                self.result = event
                self.log.append(event.message)

    def snapshot(self, losses_from: int = 0) -> dict:
        """A consistent copy for a watcher. `losses` holds the loss points from index
        `losses_from` on (a page that keeps its own series asks only for the new ones, so a poll
        costs the same at step 100 and at step 100,000); `loss_count` is how many there are."""
        with self._lock:
            return {
                "id": self.id, "name": self.name, "kind": self.kind, "state": self.state,
                "losses": self.losses[max(0, losses_from):], "loss_count": len(self.losses),
                "validation": list(self.validation),
                "previews": list(self.previews),
                "saved": list(self.saved), "log": list(self.log),
                "progress": self.last_progress, "result": self.result,
                "started": self.started, "ended": self.ended,
            }

    def changes(self) -> tuple[int, int, str]:
        """(loss points, previews, state): a watcher compares it to skip an unchanged poll
        without copying anything."""
        return len(self.losses), len(self.previews), self.state

    @property
    def active(self) -> bool:
        return self.state in (QUEUED, RUNNING)


class JobRunner:
    def __init__(self, paths: Paths, history: int = 20, queue_file: Path | None = None,
                 worker_process: bool | None = None, warm_modules: tuple[str, ...] = ()):
        """`worker_process`: run ProcessTask jobs (training) in the worker process; None
        (the app's default) unless DANLU_TRAIN_IN_PROCESS=1 asks to train on this thread.
        `warm_modules`: what that process imports while it waits for its first job."""
        self.paths = paths
        if worker_process is None:
            worker_process = wanted()
        self.process = WorkerProcess(warm_modules=warm_modules) if worker_process else None
        self.queue_file = queue_file
        self._ids = itertools.count(1)
        self._queue: deque[Job] = deque()
        self._jobs: deque[Job] = deque(maxlen=history)
        self._current: Job | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="danlu-worker", daemon=True)
        self._worker.start()

    def submit(self, name: str, kind: str, fn: Callable[[JobContext], Any], config: Any = None,
               queue: bool = False, spec: dict | None = None) -> Job:
        with self._cond:
            if self._closed:
                raise Busy("the app is shutting down; no new jobs are started")
            if not queue and (self._current is not None or self._queue):
                running = self._current or self._queue[0]
                raise Busy(f"'{running.name}' is already running; interrupt it or wait "
                           "until it finishes before starting another job")
            job = Job(id=next(self._ids), name=name, kind=kind, fn=fn, config=config, spec=spec)
            self._queue.append(job)
            self._jobs.append(job)
            self._persist()
            self._cond.notify_all()
            return job

    def move(self, job_id: int, offset: int) -> bool:
        """Move a queued job `offset` places (negative: earlier). True if it moved."""
        with self._cond:
            order = list(self._queue)
            index = next((i for i, job in enumerate(order) if job.id == job_id), None)
            if index is None:
                return False
            target = max(0, min(len(order) - 1, index + offset))
            if target == index:
                return False
            order.insert(target, order.pop(index))
            self._queue = deque(order)
            self._persist()
            return True

    def restore(self, rebuild: Callable[[dict], tuple[str, str, Callable, Any]]) -> list[Job]:
        """Queue again the jobs that were pending when the app last closed. `rebuild` turns a
        spec into (name, kind, fn, config); a spec it cannot rebuild is reported and dropped."""
        if self.queue_file is None or not self.queue_file.exists():
            return []
        try:
            specs = json.loads(self.queue_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        jobs = []
        for spec in specs if isinstance(specs, list) else []:
            try:
                name, kind, fn, config = rebuild(spec)
            except Exception as error:  # a stale spec must not stop the others
                failed = Job(id=next(self._ids), name=str(spec.get("name", "job")), kind="train",
                             fn=lambda ctx: None, spec=None, state=FAILED)
                failed.result = ev.Failed(message=f"could not restore a queued job: {error}")
                with self._cond:
                    self._jobs.append(failed)
                continue
            jobs.append(self.submit(name, kind, fn, config=config, queue=True, spec=spec))
        return jobs

    def _persist(self) -> None:
        """Write the pending jobs' specs (call with the lock held)."""
        if self.queue_file is None or self._closed:
            return
        specs = [job.spec for job in self._queue if job.spec is not None]
        from core.atomic import atomic_write_text
        atomic_write_text(self.queue_file, json.dumps(specs, indent=1))

    def stop(self, job_id: int | None = None) -> bool:
        """Ask a running job to stop, or drop a queued one. True if something was affected."""
        with self._cond:
            if self._current is not None and job_id in (None, self._current.id):
                self._current.stop_event.set()
                return True
            for job in list(self._queue):
                if job.id == job_id:
                    self._queue.remove(job)
                    job.state = STOPPED
                    job.result = ev.Finished(step=0, message="removed from the queue")
                    self._persist()
                    return True
            return False

    def shutdown(self, timeout: float = 60.0) -> Job | None:
        """Refuse new jobs, drop queued ones, ask the running job to save and stop, and wait
        up to `timeout` seconds for it to end. Returns the job that was running (check its
        `active` to see whether it ended in time), or None if nothing was running."""
        with self._cond:
            self._closed = True
            for job in self._queue:
                job.state = STOPPED
                job.result = ev.Finished(step=0, message="removed from the queue: the app closed")
            self._queue.clear()
            job = self._current
            if job is not None:
                job.stop_event.set()
            self._cond.notify_all()
        if job is not None:
            self.wait(job, timeout)
        if self.process is not None:  # a job still saving there finishes before it exits
            self.process.close(timeout=0 if job is not None and job.active else 10)
        return job

    def current(self) -> Job | None:
        with self._cond:
            return self._current

    def latest(self, kind: str | None = None) -> Job | None:
        """The running job, else the most recent one (of a kind): what a fresh page shows."""
        with self._cond:
            if self._current is not None and kind in (None, self._current.kind):
                return self._current
            for job in reversed(self._jobs):
                if kind in (None, job.kind):
                    return job
            return None

    def get(self, job_id: int) -> Job | None:
        with self._cond:
            return next((j for j in self._jobs if j.id == job_id), None)

    def queued(self) -> list[Job]:
        with self._cond:
            return list(self._queue)

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Block until the job ended; True if it did within the timeout."""
        deadline = None if timeout is None else time.time() + timeout
        with self._cond:
            while job.active:
                left = None if deadline is None else deadline - time.time()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                job = self._queue.popleft()
                self._persist()
                self._current = job
                job.state = RUNNING
                job.started = time.time()
            self._run(job)
            with self._cond:
                self._current = None
                job.ended = time.time()
                self._cond.notify_all()

    def _run(self, job: Job) -> None:
        ctx = JobContext(job, self.paths)
        try:
            if self.process is not None and isinstance(job.fn, ProcessTask):
                self.process.run(job.fn, ctx, job.id)
            else:
                job.fn(ctx)
            if job.result is None:
                job.record(ev.Finished(step=job.last_progress.step if job.last_progress else 0,
                                       message="finished"))
            job.state = STOPPED if job.stop_event.is_set() else DONE
        except Exception as error:  # the worker must survive any job
            details = getattr(error, "details", None) or traceback.format_exc()
            message = getattr(error, "user_message", None) or f"{type(error).__name__}: {error}"
            job.record(ev.Failed(message=message, details=details))
            job.state = FAILED
