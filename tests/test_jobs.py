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


def test_queue_is_ordered_persisted_and_survives_a_restart(tmp_path):
    queue_file = tmp_path / "queue.json"
    runner = JobRunner(Paths(tmp_path), queue_file=queue_file)
    release = threading.Event()
    runner.submit("blocker", "train", lambda ctx: release.wait(10))
    ran = []
    specs = [{"method": "fake", "name": f"job {i}", "config": {"n": i}} for i in range(3)]
    jobs = [runner.submit(s["name"], "train", lambda ctx, i=i: ran.append(i), queue=True, spec=s)
            for i, s in enumerate(specs)]
    assert runner.move(jobs[2].id, -2)
    assert runner.stop(jobs[1].id)  # removed from the queue
    import json
    assert [s["name"] for s in json.loads(queue_file.read_text())] == ["job 2", "job 0"]
    runner.shutdown(timeout=0.1)  # the app closes: pending jobs stay in the file
    release.set()

    restarted = JobRunner(Paths(tmp_path), queue_file=queue_file)
    done = []

    def rebuild(spec):
        return spec["name"], "train", (lambda ctx: done.append(spec["config"]["n"])), None
    restored = restarted.restore(rebuild)
    assert [j.name for j in restored] == ["job 2", "job 0"]
    assert restarted.wait(restored[-1], 10)
    assert done == [2, 0]
    assert json.loads(queue_file.read_text()) == []


def test_a_spec_that_cannot_be_rebuilt_does_not_block_the_rest(tmp_path):
    import json
    queue_file = tmp_path / "queue.json"
    queue_file.write_text(json.dumps([{"name": "bad"}, {"name": "good"}]))
    runner = JobRunner(Paths(tmp_path), queue_file=queue_file)

    def rebuild(spec):
        if spec["name"] == "bad":
            raise KeyError("method")
        return "good", "train", (lambda ctx: None), None
    restored = runner.restore(rebuild)
    assert [j.name for j in restored] == ["good"]
    assert runner.wait(restored[0], 10) and restored[0].state == DONE


def test_registry_specs_rebuild_the_same_config():
    from trainers.configs import LoraConfig
    from webui.jobs import job_parts, rebuild
    cfg = LoraConfig(model="tiny-demo", output_name="x", train_data_dir="d", network_dim=16)
    name, kind, fn, spec = job_parts("lora", cfg)
    import json
    again = rebuild(json.loads(json.dumps(spec)))
    assert again[0] == name == "LoRA: x" and again[3] == cfg


def test_preprocess_jobs_queue_and_rebuild_too(tmp_path):
    import json
    from preprocess.config import PreprocessConfig
    from tests.conftest import photo
    from webui.jobs import job_parts, rebuild
    source = tmp_path / "src"
    source.mkdir()
    photo(0).save(source / "a.png")
    cfg = PreprocessConfig(source=str(source), destination=str(tmp_path / "dst"), width=64, height=64)
    name, kind, fn, spec = job_parts("preprocess", cfg)
    assert kind == "preprocess"
    again = rebuild(json.loads(json.dumps(spec)))
    assert again[3] == cfg
    runner = JobRunner(Paths(tmp_path))
    job = runner.submit(*again[:3], queue=True)
    assert runner.wait(job, 60) and job.state == DONE
    assert any(p.suffix == ".png" for p in (tmp_path / "dst").iterdir())


def test_snapshot_can_return_only_the_new_loss_points(runner):
    release = threading.Event()

    def work(ctx):
        for step in range(1, 6):
            ctx.emit(ev.Progress(step=step, total=5, loss=float(step), learn_rate=0.1))
        release.wait(5)
    job = runner.submit("a", "train", work)
    deadline = time.time() + 5
    while job.changes()[0] < 5 and time.time() < deadline:
        time.sleep(0.01)
    assert job.changes() == (5, 0, "running")
    tail = job.snapshot(losses_from=3)
    assert [s for s, _, _ in tail["losses"]] == [4, 5] and tail["loss_count"] == 5
    assert job.snapshot(losses_from=5)["losses"] == []
    assert [s for s, _, _ in job.snapshot()["losses"]] == [1, 2, 3, 4, 5]  # default: all
    release.set()
    assert runner.wait(job, 5)
