"""Training in a long-lived worker process, so the web server's Python (and its GIL) never slows
a training step.

The JobRunner stays the only owner of job state; for a job whose work is a ProcessTask it hands
the task to a WorkerProcess instead of calling it on its own thread. The worker
(`python -m core.worker_main`) is started on the first such job and kept: what it caches between
jobs (the loaded base model) makes the next Train click fast. The two talk in JSON lines: the
app sends `run` / `stop` commands on the worker's stdin, the worker answers with the job's
events (core.events.to_json) and a `done` line on its stdout; its own prints go to its stderr,
which the app passes on to its console. If the worker dies, the job fails with a message naming
how, and the next job starts a fresh worker."""
from __future__ import annotations

import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass

from core import events as ev
from core.paths import REPO_DIR

IN_PROCESS_VARIABLE = "DANLU_TRAIN_IN_PROCESS"  # "1": train on the app's own worker thread
_END = object()


@dataclass(frozen=True)
class ProcessTask:
    """A job's work that may run in the worker process: `target` ("package.module:function") is
    called as function(ctx, *args); the args must survive JSON (a config as a dict). Called
    directly, it runs in this process (the in-thread mode)."""
    target: str
    args: tuple = ()

    def __call__(self, ctx):
        return resolve(self.target)(ctx, *self.args)


def resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def wanted() -> bool:
    """Whether the app trains in a worker process (the default) or on its own thread."""
    return os.environ.get(IN_PROCESS_VARIABLE, "").strip() not in ("1", "true", "yes")


THREADS_VARIABLE = "DANLU_WORKER_THREADS"  # torch CPU threads of the worker, if set
WARM_VARIABLE = "DANLU_WORKER_WARM"  # comma-separated modules the worker imports while idle


def worker_threads(environ=os.environ) -> int:
    """CPU threads for the worker's torch: DANLU_WORKER_THREADS, else all CPUs but one, which
    stays with the web server. Torch's threads spin while they wait for each other, so on a
    machine whose every core trains, each page poll stalls a whole step (20 polling pages cut
    tiny-model training by 63% on 2 CPUs; with one core left to the server, by ~2%)."""
    value = environ.get(THREADS_VARIABLE, "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


class TaskFailed(RuntimeError):
    """The task raised in the worker (message as the page shows it), or the worker died."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.user_message = message
        self.details = details


class _Child:
    """One started worker: its process and the lines its stdout gave so far."""

    def __init__(self, process: subprocess.Popen, tail: deque):
        self.process = process
        self.lines: queue.Queue = queue.Queue()
        self.tail = tail


class WorkerProcess:
    def __init__(self, env: dict | None = None, stream=None, warm_modules: tuple[str, ...] = ()):
        """`warm_modules`: what the worker imports while it waits for its first job (the app
        names the training libraries; core knows none of them)."""
        self.env = env
        self.warm_modules = tuple(warm_modules)
        self.stream = stream  # where the worker's own output goes (the app's stderr)
        self._child: _Child | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.process.pid if child is not None and child.process.poll() is None else None

    def start(self) -> None:
        """Start the worker now (it imports the training libraries while the user fills in the
        form), so the first Train click does not wait for that."""
        with self._lock:
            self._ensure()

    def run(self, task: ProcessTask, ctx, job_id: int, poll: float = 0.2):
        """Run `task` in the worker, relay its events into `ctx` (and a stop request from
        `ctx.should_stop()` to it) until it is done. Raises TaskFailed if it failed or the
        worker died."""
        with self._lock:
            child = self._ensure()
            command = {"op": "run", "job": job_id, "target": task.target,
                       "args": list(task.args), "paths": {"data_dir": str(ctx.paths.data_dir),
                                                          "confine": bool(ctx.paths.confine)}}
            asked = not self._send(child, command)
            while True:
                try:
                    line = child.lines.get(timeout=poll)
                except queue.Empty:
                    line = None
                if line is _END:
                    raise TaskFailed(self._death_message(child))
                if line is not None:
                    done = self._handle(line, ctx, job_id)
                    if done is not None:
                        if done.get("ok"):
                            return None
                        raise TaskFailed(str(done.get("message") or "the job failed"),
                                         str(done.get("details") or ""))
                if not asked and ctx.should_stop():
                    asked = True
                    self._send(child, {"op": "stop", "job": job_id})

    def close(self, timeout: float = 10.0) -> None:
        """End the worker: it finishes (saves and stops) a job it still runs, then exits."""
        child, self._child = self._child, None
        if child is None:
            return
        try:
            child.process.stdin.close()
        except OSError:
            pass
        try:
            child.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass  # still saving; it exits by itself once done (its stdin is closed)

    # ------------------------------------------------------------------ internals

    def _ensure(self) -> _Child:
        child = self._child
        if child is not None and child.process.poll() is None:
            return child
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[WARM_VARIABLE] = ",".join(self.warm_modules)
        if "OMP_NUM_THREADS" not in env or THREADS_VARIABLE in env:  # a user's choice stays
            threads = str(worker_threads(env))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        # -P: the current folder (the data folder in a shared app) is not put on sys.path.
        # Its own session: a Ctrl-C meant for the app reaches training as the app's stop.
        process = subprocess.Popen([sys.executable, "-P", "-m", "core.worker_main"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                   errors="replace", bufsize=1, env=env,
                                   start_new_session=True)
        child = _Child(process, deque(maxlen=40))
        threading.Thread(target=self._read_events, args=(child,), daemon=True,
                         name="danlu-worker-events").start()
        threading.Thread(target=self._read_errors, args=(child,), daemon=True,
                         name="danlu-worker-stderr").start()
        self._child = child
        return child

    @staticmethod
    def _read_events(child: _Child) -> None:
        try:
            for line in child.process.stdout:
                child.lines.put(line.rstrip("\n"))
        finally:
            child.lines.put(_END)

    def _read_errors(self, child: _Child) -> None:
        stream = self.stream or sys.stderr
        for line in child.process.stderr:
            child.tail.append(line.rstrip("\n"))
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass

    @staticmethod
    def _send(child: _Child, command: dict) -> bool:
        try:
            child.process.stdin.write(json.dumps(command) + "\n")
            child.process.stdin.flush()
            return True
        except (OSError, ValueError):  # it died; its end of stdout says so
            return False

    @staticmethod
    def _handle(line: str, ctx, job_id: int) -> dict | None:
        """Emit an event line into ctx; return a `done` line of this job, else None."""
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if isinstance(data, dict) and data.get("worker") == "done":
            return data if data.get("job") == job_id else None
        event = ev.from_json(line) if isinstance(data, dict) else None
        if event is not None:
            ctx.emit(event)
        elif line.strip() and not (isinstance(data, dict) and "worker" in data):
            ctx.emit(ev.Status(line.strip()[:500]))
        return None

    def _death_message(self, child: _Child) -> str:
        try:
            code = child.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        pid = child.process.pid
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = {
                "SIGKILL": f"was killed ({name}): most often the system's out-of-memory killer "
                           "ending the biggest process when RAM ran out (see `dmesg`), or "
                           "someone ended it",
                "SIGSEGV": f"crashed ({name}, a segmentation fault in native code)",
                "SIGABRT": f"aborted ({name}, a fatal error in native code)",
                "SIGBUS": f"crashed ({name}, a bus error: often a file it had mapped shrank)",
            }.get(name, f"was ended by {name}")
        elif code is None:
            how = "closed its output and did not exit"
        else:
            how = f"exited with code {code}"
        tail = "\n".join(line for line in child.tail if line.strip())[-1500:]
        message = (f"The training worker process (pid {pid}) {how}. The job stopped; files it "
                   "saved before are kept. The next job starts a fresh worker process.")
        return f"{message}\n\nIts last output:\n{tail}" if tail else message
