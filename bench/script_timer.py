"""Run a diffusers example script unchanged and time its steps; run by path, not as a module:

    DANLU_BENCH_OUT=out.json python bench/script_timer.py SCRIPT.py --script --args ...

`torchvision` for the script: $DANLU_BENCH_STANDIN names a folder holding the stand-in package
(bench/torchvision_standin.py). It goes on sys.path only after transformers has asked whether
torchvision is installed (transformers checks with `find_spec` alone and caches the answer), so
the libraries keep their no-torchvision code paths, exactly as in a plain install without it,
and only the script's own `from torchvision import transforms` gets the stand-in.

The scripts advance a tqdm bar named "Steps" ($DANLU_BENCH_BAR: sd-scripts' "steps") once per optimizer step (`progress_bar.update(1)`
after `optimizer.step()`). This wrapper patches `tqdm.std.tqdm.update` so that every update of
that bar is a step end for a `StepRecorder` (bench/flopcount.py), then runs the script with
`runpy` as `__main__`, with `sys.argv` and `sys.path[0]` as `python SCRIPT.py ...` would have.
At exit it writes JSON to $DANLU_BENCH_OUT: per-step wall and CPU seconds, time from spawn
($DANLU_BENCH_T0) to the first step, peak RSS at the last step and at exit (getrusage of this
process), and the FLOPs of step $DANLU_BENCH_FLOP_STEP.
"""
from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
import time
import traceback
from pathlib import Path

T_SPAWN = float(os.environ.get("DANLU_BENCH_T0", time.time()))
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from flopcount import StepRecorder, peak_rss_mib  # noqa: E402

sys.path.remove(str(HERE))
del sys.modules["flopcount"]  # keep the name free; the classes stay alive through these names

BAR_NAME = os.environ.get("DANLU_BENCH_BAR", "Steps")  # sd-scripts' bar is "steps"


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: script_timer.py SCRIPT.py [script args...]")
    script = Path(sys.argv[1]).resolve()
    out_path = os.environ.get("DANLU_BENCH_OUT")
    flop_step = os.environ.get("DANLU_BENCH_FLOP_STEP")
    recorder = StepRecorder(flop_step=int(flop_step) if flop_step else None)
    state = {"first_wall": None, "steps": 0, "error": None}

    import tqdm.std

    original_update = tqdm.std.tqdm.update

    def update(bar, n=1):
        result = original_update(bar, n)
        if getattr(bar, "desc", "") == BAR_NAME and n:
            state["steps"] += int(n)
            if state["first_wall"] is None:
                state["first_wall"] = time.time()
            recorder.step_done(state["steps"])
        return result

    tqdm.std.tqdm.update = update

    standin = os.environ.get("DANLU_BENCH_STANDIN")
    if standin:
        from transformers.utils import import_utils
        import_utils.is_torchvision_available()  # cached False before the stand-in is visible
        sys.path.append(standin)

    def write() -> None:
        recorder.close()
        data = {"side": "baseline", "script": script.name, **recorder.summary(),
                "rss_exit_mib": peak_rss_mib(), "error": state["error"]}
        if state["first_wall"] is not None:
            data["ttfs_spawn_s"] = state["first_wall"] - T_SPAWN
        if out_path:
            Path(out_path).write_text(json.dumps(data))

    atexit.register(write)
    sys.argv = [str(script)] + sys.argv[2:]
    sys.path.insert(0, str(script.parent))
    recorder.begin()
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (None, 0):
            state["error"] = f"SystemExit({exit_.code})"
            raise
    except BaseException as error:
        state["error"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}"
        raise


if __name__ == "__main__":
    main()
