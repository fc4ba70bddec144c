import threading
import time

import pytest

from core import events as ev
from core.jobs import DONE, FAILED, STOPPED, Busy, JobRunner
from core.paths import Paths


@pytest.fixture
def runner(tmp_path):
    return JobRunner(Paths(tmp_path))


def test_runs_a_job_and_records_events(runner):
    def work(ctx):
        for step in range(1, 4):
            ctx.emit(ev.Progress(step=step, total=3, loss=1.0 / step, learn_rate=0.1))
        ctx.emit(ev.Preview(step=3, path="/x.png"))
    job = runner.submit("a", "train", work)
    assert runner.wait(job, 10)
    snap = job.snapshot()
    assert snap["state"] == DONE
    assert [s for s, _, _ in snap["losses"]] == [1, 2, 3]
    assert snap["previews"][0].path == "/x.png"
    assert isinstance(snap["result"], ev.Finished)


def test_second_job_is_refused_while_one_runs_unless_queued(runner):
    release = threading.Event()
    order = []
    first = runner.submit("first", "train", lambda ctx: (release.wait(5), order.append(1)))
    with pytest.raises(Busy, match="'first' is already running"):
        runner.submit("second", "train", lambda ctx: order.append(2))
    queued = runner.submit("third", "train", lambda ctx: order.append(3), queue=True)
    assert [j.name for j in runner.queued()] in (["third"], ["first", "third"])
    release.set()
    assert runner.wait(queued, 10)
    assert order == [1, 3]
    assert first.state == DONE


def test_stop_sets_the_flag_and_failure_keeps_the_worker_alive(runner):
    def loop(ctx):
        while not ctx.should_stop():
            time.sleep(0.01)
    job = runner.submit("loop", "train", loop)
    time.sleep(0.1)
    assert runner.stop()
    assert runner.wait(job, 5) and job.state == STOPPED

    def boom(ctx):
        raise ValueError("bad thing")
    failed = runner.submit("boom", "train", boom)
    runner.wait(failed, 5)
    assert failed.state == FAILED and "bad thing" in failed.result.message
    after = runner.submit("after", "train", lambda ctx: None)
    assert runner.wait(after, 5) and after.state == DONE


def test_latest_reattaches_to_the_running_job(runner):
    release = threading.Event()
    job = runner.submit("long", "train", lambda ctx: release.wait(5))
    time.sleep(0.05)
    assert runner.latest("train") is job
    assert runner.latest("preprocess") is None
    release.set()
    runner.wait(job, 5)
    assert runner.latest("train") is job
