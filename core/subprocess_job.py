"""A job that runs a training program in a subprocess (the app's multi-process runs, started
with `accelerate launch`) and relays the events it prints as JSON lines (core.events.to_json)
into the job's context, so the page shows it as any other job. Interrupt creates the stop file
the program watches: it saves and stops, as an in-app job does."""
from __future__ import annotations

import queue
import subprocess
import threading
from collections import deque
from pathlib import Path

from core import events as ev

_END = object()


class ProcessFailed(RuntimeError):
    def __init__(self, message: str):
        super().__init__(message)
        self.user_message = message


def _pump(stream, sink) -> None:
    try:
        for line in stream:
            sink(line.rstrip("\n"))
    finally:
        stream.close()


def relay_process(command: list[str], ctx, stop_file: Path, *, cwd: Path | None = None,
                  env: dict | None = None, poll: float = 0.2) -> ev.Finished:
    """Run `command`, emit its events into `ctx` until it ends, and return its Finished event.
    Its Failed event, or an exit without one, raises ProcessFailed with the message (and the
    end of its error output)."""
    stop_file.unlink(missing_ok=True)
    lines: queue.Queue = queue.Queue()
    errors: deque[str] = deque(maxlen=30)
    # its own session: a Ctrl-C meant for the app reaches training as the app's interrupt
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               bufsize=1, cwd=cwd, env=env, start_new_session=True)
    readers = [threading.Thread(target=_pump, args=(process.stdout, lines.put), daemon=True),
               threading.Thread(target=_pump, args=(process.stderr, errors.append), daemon=True)]
    for reader in readers:
        reader.start()
    threading.Thread(target=lambda: (readers[0].join(), lines.put(_END)), daemon=True).start()
    result: ev.Finished | ev.Failed | None = None
    asked = False
    try:
        while True:
            try:
                line = lines.get(timeout=poll)
            except queue.Empty:
                line = None
            if line is _END:
                break
            if line is not None:
                event = ev.from_json(line)
                if isinstance(event, (ev.Finished, ev.Failed)):
                    result = event
                elif event is not None:
                    ctx.emit(event)
                elif line.strip():  # a library's own print: keep it in the log
                    ctx.emit(ev.Status(line.strip()[:500]))
            if not asked and ctx.should_stop():
                stop_file.touch()
                asked = True
                ctx.emit(ev.Status("Interrupting: the training processes save and stop after "
                                   "this step"))
        code = process.wait()
        readers[1].join(timeout=5)
    finally:
        if process.poll() is None:  # the watcher itself failed: still let training save
            stop_file.touch()
        else:
            stop_file.unlink(missing_ok=True)
    if isinstance(result, ev.Finished):
        ctx.emit(result)
        return result
    if isinstance(result, ev.Failed):
        message = result.message.removeprefix("error: ")
    else:
        message = f"the training processes ended (exit code {code}) without finishing"
    tail = "\n".join(errors).strip()
    raise ProcessFailed(f"{message}\n\n{tail[-2000:]}" if tail and result is None else message)
