"""UI overhead: the same training run through the page's path vs the CLI's, in one process.

    python -m bench.ui_overhead SPEC.json      (SPEC as for bench.danlu_run, plus "rounds")
    python -m bench.ui_overhead SPEC.json --side cli|page   (one path only: a paired child)

- CLI path: what `python -m trainers` does: `runner(method)(cfg, ConsoleContext)` on the main
  thread, the tqdm bar written to /dev/null.
- Page path: what the Train button does: `JobRunner.submit(..., lambda ctx: run(cfg, ctx))`, the
  run on the worker thread, and a page attached: a poller thread that once a second does what
  the Train tab's gr.Timer handler does (`live.refresh`: the job's new loss points only, the
  status line, the thinned loss series, the gallery when previews changed) plus Gradio's own
  postprocessing of the loss plot (`gr.LinePlot.postprocess`), when gradio imports.
  Gradio's HTTP/websocket send is not included.

The two alternate (CLI, page, page, CLI, ...) with the model already loaded (an untimed
warm-up run first), each run from a fresh copy of the same step-0 file. With `--side`, one
process runs only one path; `python -m bench --paired` runs a CLI child and a page child at
the same time, each pinned to its own CPU, swapping CPUs every pair. The overhead is the
mean seconds per step of the page runs over the CLI runs (means, not medians: a poll costs a
spike once a second that a median would hide). Also: the cost of one poll with a long history
(100,000 loss points, 500 previews) for an attached page and for a fresh one (a reload).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import danlu_run, fixtures  # noqa: E402

WARMUP_STEPS = 2


class _Timestamps:
    """Wraps a context: records when each Progress arrives, then passes the event on."""

    def __init__(self, inner):
        self.inner = inner
        self.paths = inner.paths
        self.ends: list[tuple[float, float]] = []  # (perf_counter, process_time)

    def emit(self, event) -> None:
        from core import events as ev
        if isinstance(event, ev.Progress):
            self.ends.append((time.perf_counter(), time.process_time()))
        self.inner.emit(event)

    def should_stop(self) -> bool:
        return self.inner.should_stop()


def _page_renderer():
    """What one gr.Timer tick of the Train tab computes (webui/tab_train.py `poll`):
    `live.refresh` with the page's Watch (only the new loss points), plus Gradio's own
    postprocessing of the loss plot (`gr.LinePlot.postprocess`) when the plot changed."""
    from webui import live
    try:
        import gradio as gr
        plot = gr.LinePlot(x="step", y="loss", color="series")
    except Exception:  # gradio missing or changed: measure the engine-side part only
        plot = None
    page = {"watch": live.Watch()}

    def tick(runner, fresh: bool = False) -> None:
        if fresh:  # a reload: a new page with an empty Watch
            page["watch"] = live.Watch()
        changed = live.refresh(runner, page["watch"])
        if plot is not None and changed.get("plot") is not None:
            plot.postprocess(changed["plot"])

    return tick, plot is not None


def _per_step(ends: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean wall and CPU seconds per step after the warm-up steps."""
    tail = ends[WARMUP_STEPS - 1:]
    steps = len(tail) - 1
    return ((tail[-1][0] - tail[0][0]) / steps, (tail[-1][1] - tail[0][1]) / steps)


def run_cli(spec: dict, folder: Path) -> tuple[float, float]:
    from core.console import ConsoleContext
    from core.paths import Paths
    from trainers.registry import runner

    paths = Paths(fixtures.fresh_data_dir(spec["kind"], folder)).ensure()
    cfg, _ = danlu_run.make_config(spec, preview=False)
    with open(os.devnull, "w") as sink:
        ctx = _Timestamps(ConsoleContext(paths, stream=sink))
        runner(danlu_run.engine_method(spec["method"]))(cfg, ctx)
    return _per_step(ctx.ends)


def run_page(spec: dict, folder: Path, tick) -> tuple[float, float, list[float]]:
    from core.jobs import JobRunner
    from core.paths import Paths
    from trainers.registry import runner as method_runner

    paths = Paths(fixtures.fresh_data_dir(spec["kind"], folder)).ensure()
    cfg, _ = danlu_run.make_config(spec, preview=False)
    run = method_runner(danlu_run.engine_method(spec["method"]))
    jobs = JobRunner(paths)
    holder: dict = {}

    def fn(ctx):
        holder["ctx"] = _Timestamps(ctx)
        return run(cfg, holder["ctx"])

    polls: list[float] = []
    done = threading.Event()

    def poller():
        fresh = True  # each run is watched by a new page (job ids restart with each runner)
        while not done.wait(1.0):
            started = time.perf_counter()
            tick(jobs, fresh=fresh)
            polls.append(time.perf_counter() - started)
            fresh = False

    watcher = threading.Thread(target=poller, daemon=True)
    watcher.start()
    job = jobs.submit("bench", "train", fn, config=cfg)
    jobs.wait(job)
    done.set()
    watcher.join()
    if job.state != "done":
        raise RuntimeError(f"page-path job ended {job.state}: {getattr(job.result, 'message', '')}")
    wall, cpu = _per_step(holder["ctx"].ends)
    return wall, cpu, polls


def long_history_poll(tick) -> tuple[float, float]:
    """Seconds for one poll of a job with 100,000 loss points and 500 previews: (a page that
    is attached and gets one new point, the first poll of a fresh page: the whole history)."""
    from core import events as ev
    from core.jobs import Job

    job = Job(id=1, name="long", kind="train", fn=lambda ctx: None, state="running")
    for step in range(1, 100_001):
        job.record(ev.Progress(step=step, total=200_000, loss=0.1 + (step % 7) * 0.01,
                               learn_rate=1e-4, elapsed=step * 0.5))
    for step in range(500):
        job.record(ev.Preview(step=step * 200, path=f"/tmp/p{step}.png", caption="c"))

    class One:
        def latest(self, kind=None):
            return job

        def queued(self):
            return []

    def timed(fresh: bool) -> float:
        job.record(ev.Progress(step=len(job.losses) + 1, total=200_000, loss=0.1,
                               learn_rate=1e-4, elapsed=1.0))  # a new point: the plot redraws
        started = time.perf_counter()
        tick(One(), fresh=fresh)
        return time.perf_counter() - started

    first = [timed(True) for _ in range(3)]
    attached = [timed(False) for _ in range(7)]
    return statistics.median(attached), statistics.median(first)


def run_side(spec: dict, side: str, rounds: int, work: Path, tick) -> dict:
    """`rounds` runs of one path (a paired child: the other path runs at once on another CPU)."""
    run_cli(dict(spec, steps=3), work / f"warmup-{side}")  # loads (and caches) the model
    walls, cpus, polls = [], [], []
    for index in range(rounds):
        if side == "cli":
            wall, cpu = run_cli(spec, work / f"cli-{index}")
        else:
            wall, cpu, run_polls = run_page(spec, work / f"page-{index}", tick)
            polls += run_polls
        walls.append(wall)
        cpus.append(cpu)
    return {"s_per_step": walls, "cpu_per_step": cpus, "poll_s": polls}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    side = argv[2] if len(argv) > 2 and argv[1] == "--side" else None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(spec["workdir"])
    out: dict = {"method": spec["method"], "kind": spec["kind"], "steps": spec["steps"],
                 "rounds": spec.get("rounds", 3)}
    try:
        tick, with_gradio = _page_renderer()
        out["gradio_postprocess"] = with_gradio
        if side is not None:
            out.update(run_side(spec, side, out["rounds"], work, tick), side=side)
            if side == "page":
                out["long_history_poll_s"], out["reload_poll_s"] = long_history_poll(tick)
            print("BENCH_JSON " + json.dumps(out), flush=True)
            return 0
        run_cli(dict(spec, steps=3), work / "warmup")  # loads (and caches) the model
        cli, page, polls = [], [], []
        for index in range(out["rounds"]):
            order = ("cli", "page") if index % 2 == 0 else ("page", "cli")
            for one in order:
                if one == "cli":
                    cli.append(run_cli(spec, work / f"cli-{index}"))
                else:
                    wall, cpu, run_polls = run_page(spec, work / f"page-{index}", tick)
                    page.append((wall, cpu))
                    polls += run_polls
        attached, reload_poll = long_history_poll(tick)
        out.update({"cli_s_per_step": [w for w, _ in cli], "page_s_per_step": [w for w, _ in page],
                    "cli_cpu_per_step": [c for _, c in cli], "page_cpu_per_step": [c for _, c in page],
                    "poll_s": polls, "long_history_poll_s": attached,
                    "reload_poll_s": reload_poll})
    except Exception as error:
        import traceback
        out["error"] = f"{type(error).__name__}: {error}"
        out["traceback"] = traceback.format_exc()[-4000:]
    print("BENCH_JSON " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
