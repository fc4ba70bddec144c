"""For tests/test_crash_anywhere.py: imports torch and loads the tiny model once, then forks one
LoRA training process per request, so each of many killed runs starts in milliseconds instead of
importing torch again (about 5-10 s here).

    python3 -m tests.crash_server DATA_DIR CONFIG_JSON

Reads one JSON request a line on stdin: {"set": {setting: value}, "events": PATH, "kill_at":
[NAME, COUNT] or null}. For each it prints {"pid": ...} when the child started and {"exit": code} or
{"signal": number} when it ended. The child writes its events as JSON lines to PATH and, with
kill_at, SIGKILLs itself the COUNT-th time it reaches the named place (core/crash_points.py).
Torch runs on one thread here (no thread pool exists when it forks)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class FileEvents:
    """A job context that appends every event to a file as one JSON line."""

    def __init__(self, paths, out):
        self.paths, self.out = paths, out

    def emit(self, event) -> None:
        from core import events as ev
        self.out.write(ev.to_json(event) + "\n")
        self.out.flush()

    def should_stop(self) -> bool:
        return False


def _child(paths, base: dict, request: dict) -> int:
    from core import crash_points
    from trainers.configs import LoraConfig
    from trainers.loop import TrainingError
    from trainers.methods.lora import run
    if request.get("kill_at"):
        crash_points.arm(*request["kill_at"])
    with open(request["events"], "w", encoding="utf-8") as out:
        try:
            run(LoraConfig(**{**base, **request["set"]}).validate(),
                FileEvents(paths, out))
        except TrainingError as error:
            out.write(json.dumps({"event": "TrainingError", "message": error.user_message}) + "\n")
            return 1
    return 0


def main() -> None:
    data_dir, config = sys.argv[1], json.loads(sys.argv[2])
    import torch
    torch.set_num_threads(1)
    from core.paths import Paths
    from trainers.models import load_model
    import trainers.methods.lora  # noqa: F401
    paths = Paths(Path(data_dir)).ensure()
    load_model(paths, config["model"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1):
                os.dup2(devnull, fd)
            code = 1
            try:
                code = _child(paths, config, request)
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            print(json.dumps({"signal": os.WTERMSIG(status)}), flush=True)
        else:
            print(json.dumps({"exit": os.WEXITSTATUS(status)}), flush=True)


if __name__ == "__main__":
    main()
