"""JobContexts for the command line: events become a tqdm bar and printed lines, or JSON lines
for a program that runs the CLI (the app's multi-process runs), or only errors (the other
processes of a multi-process run)."""
from __future__ import annotations

import errno
import signal
import sys
import threading
from pathlib import Path

from core import events as ev
from core.paths import Paths


OWN_PACKAGES = ("core", "trainers", "preprocess")  # whose exceptions carry messages for users


def failure_message(error: BaseException, what: str) -> str:
    """One line saying what failed and why, for any exception: the message of one of our own
    errors (they name the field or file), else `what` and the exception's type and text."""
    known = getattr(error, "user_message", None)
    if known:
        return str(known)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" while writing {error.filename}" if error.filename else ""
        return (f"{what} failed: the disk is full{where}; free some space and run the same "
                "command again (files saved before are kept)")
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return (f"{what} failed: out of memory ({type(error).__name__}); lower the batch size "
                "or the image size")
    if type(error).__module__.split(".")[0] in OWN_PACKAGES and str(error):
        return str(error)
    return f"{what} failed: {type(error).__name__}: {error}"


class ConsoleContext:
    def __init__(self, paths: Paths, stream=sys.stderr, stop_file: Path | None = None):
        self.paths = paths
        self.stream = stream
        self.stop_file = stop_file  # its appearance asks to save and stop, like Ctrl-C
        self._stop = threading.Event()
        self._bar = None
        self.result: ev.Finished | ev.Failed | None = None
        self.stop_signal: int | None = None  # the signal that asked to stop, for the exit code
        self._previous_handlers: dict = {}

    def install_signal_handlers(self, repeat_aborts: bool = True) -> None:
        """Ctrl-C or SIGTERM asks the loop to save and stop instead of killing it mid-step; a
        second one aborts unless `repeat_aborts` is False (processes of `accelerate launch`,
        whose launcher forwards the signal it got: their save must not be cut short)."""
        def ask_stop(signum, frame):
            if self.stop_signal is None:
                self.stop_signal = signum
            if self._stop.is_set():
                if not repeat_aborts:
                    return
                raise KeyboardInterrupt
            self._stop.set()
            print("\nStopping after this step and saving (press again to abort)...", file=self.stream)
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, ask_stop)

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def exit_code(self) -> int:
        """What the process should exit with: 1 after a failure, 128 + the signal number after a
        stop asked for by SIGINT (130) or SIGTERM (143), else 0 (a stop file's stop included)."""
        if isinstance(self.result, ev.Failed):
            return 1
        return 128 + self.stop_signal if self.stop_signal else 0

    def should_stop(self) -> bool:
        if self.stop_file is not None and not self._stop.is_set() and self.stop_file.exists():
            self._stop.set()
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def emit(self, event: ev.Event) -> None:
        if isinstance(event, ev.Progress):
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=event.total, initial=event.start_step, file=self.stream,
                                 dynamic_ncols=True)
            self._bar.n = event.step
            self._bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.learn_rate:.2e}", refresh=False)
            self._bar.refresh()
            return
        if self._bar is not None:
            self._bar.clear()
        if isinstance(event, ev.Status):
            print(event.text, file=self.stream)
        elif isinstance(event, ev.Preview):
            print(f"preview: {event.path}", file=self.stream)
        elif isinstance(event, ev.Saved):
            print(f"saved {event.kind}: {event.path}", file=self.stream)
        elif isinstance(event, (ev.Finished, ev.Failed)):
            self.result = event
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            print(event.message, file=self.stream)


class JsonEventsContext(ConsoleContext):
    """Every event as one JSON line on `out` (core.events.to_json), flushed at once."""

    def __init__(self, paths: Paths, out=sys.stdout, stop_file: Path | None = None):
        super().__init__(paths, stream=sys.stderr, stop_file=stop_file)
        self.out = out

    def emit(self, event: ev.Event) -> None:
        if isinstance(event, (ev.Finished, ev.Failed)):
            self.result = event
        if self.out is None:
            return
        try:
            self.out.write(ev.to_json(event) + "\n")
            self.out.flush()
        except (BrokenPipeError, ValueError):  # the watcher went away (the app closed):
            self.out = None  # save and stop rather than die mid-run
            self.stop()


class QuietContext(ConsoleContext):
    """For the other processes of a multi-process run: the main process reports progress;
    these print only their own failures."""

    def __init__(self, paths: Paths, label: str, stream=sys.stderr, stop_file: Path | None = None):
        super().__init__(paths, stream=stream, stop_file=stop_file)
        self.label = label

    def emit(self, event: ev.Event) -> None:
        if isinstance(event, (ev.Finished, ev.Failed)):
            self.result = event
        if isinstance(event, ev.Failed):
            print(f"[{self.label}] {event.message}", file=self.stream)
