"""The training worker process (`python -m core.worker_main`, started by core.worker_process).

It reads commands as JSON lines on stdin: `{"op": "run", "job", "target", "args", "paths"}` runs
a task with a context whose events go out as JSON lines on stdout, followed by
`{"worker": "done", "job", "ok", "message", "details"}`; `{"op": "stop", "job"}` asks that job to
save and stop. The end of stdin (the app closed or died) stops the running job the same way and
ends the process once it has saved. Anything else the libraries print goes to stderr, so the
event stream stays clean. It lives as long as the app, keeping what it loaded (the base model)
for the next job."""
from __future__ import annotations

import importlib
import json
import os
import queue
import sys
import threading
import traceback
from pathlib import Path

from core import events as ev
from core.paths import Paths


class Output:
    """The event stream: a private copy of the original stdout, one whole line per write."""

    def __init__(self):
        self._stream = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)  # print() and progress bars of any library now go to stderr
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()


class WorkerContext:
    def __init__(self, job: int, paths: Paths, output: Output, stopped: set, closing):
        self.job = job
        self.paths = paths
        self._output = output
        self._stopped = stopped
        self._closing = closing

    def emit(self, event: ev.Event) -> None:
        self._output.line(ev.to_json(event))

    def should_stop(self) -> bool:
        return self.job in self._stopped or self._closing.is_set()


def _read_commands(commands: queue.Queue, stopped: set, closing: threading.Event) -> None:
    for line in sys.stdin:
        try:
            command = json.loads(line)
        except ValueError:
            continue
        if command.get("op") == "run":
            commands.put(command)
        elif command.get("op") == "stop":
            stopped.add(command.get("job"))
    closing.set()
    commands.put(None)


def run_one(command: dict, output: Output, stopped: set, closing) -> None:
    from core.worker_process import resolve
    job = command.get("job")
    done = {"worker": "done", "job": job, "ok": True}
    try:
        paths = Paths(Path(command["paths"]["data_dir"]),
                      confine=bool(command["paths"].get("confine")))
        ctx = WorkerContext(job, paths, output, stopped, closing)
        resolve(command["target"])(ctx, *command.get("args", ()))
    except Exception as error:  # reported to the app; the worker lives on for the next job
        message = getattr(error, "user_message", None) or f"{type(error).__name__}: {error}"
        done.update(ok=False, message=message, details=traceback.format_exc())
    finally:
        stopped.discard(job)
    output.line(json.dumps(done))


def _warm_imports() -> None:
    """What every training job imports first (the modules the app named in the environment); a
    job arriving meanwhile waits on the import lock."""
    from core.worker_process import WARM_VARIABLE
    for name in filter(None, os.environ.get(WARM_VARIABLE, "").split(",")):
        try:
            importlib.import_module(name.strip())
        except Exception:  # noqa: BLE001 - the job itself will report a broken install
            pass


def main() -> int:
    from core.malloc_tuning import tune_malloc
    tune_malloc()  # before the model's loading grows the heap
    output = Output()
    commands: queue.Queue = queue.Queue()
    stopped: set = set()
    closing = threading.Event()
    threading.Thread(target=_read_commands, args=(commands, stopped, closing), daemon=True,
                     name="danlu-worker-commands").start()
    output.line(json.dumps({"worker": "ready", "pid": os.getpid()}))
    threading.Thread(target=_warm_imports, daemon=True, name="danlu-worker-warm").start()
    while True:
        command = commands.get()
        if command is None:
            return 0
        if closing.is_set():
            continue  # the app is gone: start nothing new
        run_one(command, output, stopped, closing)


if __name__ == "__main__":
    sys.exit(main())
