"""A JobContext for the command line: events become a tqdm bar and printed lines."""
from __future__ import annotations

import signal
import sys
import threading

from core import events as ev
from core.paths import Paths


class ConsoleContext:
    def __init__(self, paths: Paths, stream=sys.stderr):
        self.paths = paths
        self.stream = stream
        self._stop = threading.Event()
        self._bar = None
        self.result: ev.Finished | ev.Failed | None = None

    def install_signal_handlers(self) -> None:
        """Ctrl-C or SIGTERM asks the loop to save and stop instead of killing it mid-step."""
        def ask_stop(signum, frame):
            if self._stop.is_set():
                raise KeyboardInterrupt
            self._stop.set()
            print("\nStopping after this step and saving (press again to abort)...", file=self.stream)
        signal.signal(signal.SIGINT, ask_stop)
        signal.signal(signal.SIGTERM, ask_stop)

    def should_stop(self) -> bool:
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
