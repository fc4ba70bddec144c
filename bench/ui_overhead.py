"""UI overhead: the same training run through the page's path vs the CLI's, in one process.

    python -m bench.ui_overhead SPEC.json      (SPEC as for bench.danlu_run, plus "rounds")

- CLI path: what `python -m trainers` does: `runner(method)(cfg, ConsoleContext)` on the main
  thread, the tqdm bar written to /dev/null.
- Page path: what the Train button does: `JobRunner.submit(..., lambda ctx: run(cfg, ctx))`, the
  run on the worker thread, and a page attached: a poller thread that once a second does what
  the Train tab's gr.Timer handler does (`job.snapshot()`, `live.status_text`,
  `live.loss_frame` when the loss list grew, `live.gallery_items` when previews changed) plus
  Gradio's own postprocessing of the loss plot (`gr.LinePlot.postprocess`), when gradio imports.
  Gradio's HTTP/websocket send is not included.

The two alternate (CLI, page, page, CLI, ...) with the model already loaded (an untimed
warm-up run first), each run from a fresh copy of the same step-0 file. The overhead is the
mean seconds per step of the page runs over the CLI runs (means, not medians: a poll costs a
spike once a second that a median would hide). Also: the cost of one poll with a long history
(100,000 loss points, 500 previews), the worst case of a long run.
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
    """What one gr.Timer tick of the Train tab computes (see webui/tab_train.py `poll`)."""
    from webui import live
    try:
        import gradio as gr
        plot = gr.LinePlot(x="step", y="loss", color="series")
    except Exception:  # gradio missing or changed: measure the engine-side part only
        plot = None
    state = {"key": (None, None, None, None)}

    def tick(runner) -> None:
        job = runner.latest("train")
        if job is None:
            return
        snap = job.snapshot()
        key = (job.id, len(snap["losses"]), len(snap["previews"]), snap["state"])
        if key == state["key"]:
            return
        changed_plot = key[:2] != state["key"][:2]
        changed_gallery = (key[0], key[2]) != (state["key"][0], state["key"][2])
        live.status_text(snap)
        if changed_plot:
            frame = live.loss_frame(snap["losses"])
            if plot is not None:
                plot.postprocess(frame)
        if changed_gallery:
            live.gallery_items(snap["previews"])
        state["key"] = key

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
        runner(spec["method"])(cfg, ctx)
    return _per_step(ctx.ends)


def run_page(spec: dict, folder: Path, tick) -> tuple[float, float, list[float]]:
    from core.jobs import JobRunner
    from core.paths import Paths
    from trainers.registry import runner as method_runner

    paths = Paths(fixtures.fresh_data_dir(spec["kind"], folder)).ensure()
    cfg, _ = danlu_run.make_config(spec, preview=False)
    run = method_runner(spec["method"])
    jobs = JobRunner(paths)
    holder: dict = {}

    def fn(ctx):
        holder["ctx"] = _Timestamps(ctx)
        return run(cfg, holder["ctx"])

    polls: list[float] = []
    done = threading.Event()

    def poller():
        while not done.wait(1.0):
            started = time.perf_counter()
            tick(jobs)
            polls.append(time.perf_counter() - started)

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


def long_history_poll(tick) -> float:
    """Seconds for one poll of a job with 100,000 loss points and 500 previews."""
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

    times = []
    for _ in range(5):
        job.losses.append((len(job.losses) + 1, 0.1, 1e-4))  # a new point: the plot redraws
        started = time.perf_counter()
        tick(One())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(spec["workdir"])
    out: dict = {"method": spec["method"], "kind": spec["kind"], "steps": spec["steps"],
                 "rounds": spec.get("rounds", 3)}
    try:
        tick, with_gradio = _page_renderer()
        out["gradio_postprocess"] = with_gradio
        run_cli(dict(spec, steps=3), work / "warmup")  # loads (and caches) the model
        cli, page, polls = [], [], []
        for index in range(out["rounds"]):
            order = ("cli", "page") if index % 2 == 0 else ("page", "cli")
            for side in order:
                if side == "cli":
                    cli.append(run_cli(spec, work / f"cli-{index}"))
                else:
                    wall, cpu, run_polls = run_page(spec, work / f"page-{index}", tick)
                    page.append((wall, cpu))
                    polls += run_polls
        out.update({"cli_s_per_step": [w for w, _ in cli], "page_s_per_step": [w for w, _ in page],
                    "cli_cpu_per_step": [c for _, c in cli], "page_cpu_per_step": [c for _, c in page],
                    "poll_s": polls, "long_history_poll_s": long_history_poll(tick)})
    except Exception as error:
        import traceback
        out["error"] = f"{type(error).__name__}: {error}"
        out["traceback"] = traceback.format_exc()[-4000:]
    print("BENCH_JSON " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
