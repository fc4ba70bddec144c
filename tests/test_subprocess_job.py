"""A job that runs a training program as a subprocess: its JSON-line events reach the job, an
interrupt makes it save and stop through the stop file, its failures fail the job."""
from __future__ import annotations

import sys
import textwrap

import pytest

from core import events as ev
from core.config import ConfigError
from core.jobs import DONE, FAILED, STOPPED, JobRunner
from core.paths import Paths
from core.subprocess_job import relay_process

FAKE_TRAINER = textwrap.dedent("""
    import json, pathlib, sys, time
    stop = pathlib.Path(sys.argv[1])
    def say(event_type, **fields):
        print(json.dumps({"event": event_type, **fields}), flush=True)
    say("Status", text="Loading model tiny-demo")
    print("a library printed this", flush=True)
    step = 0
    while step < 500:
        if stop.exists():
            say("Status", text=f"Interrupted at step {step}")
            break
        step += 1
        say("Progress", step=step, total=500, loss=1.0 / step, learn_rate=1e-4)
        if step == 2:
            say("Preview", step=2, path="/tmp/p.png", caption="step 2")
        time.sleep(0.05)
    say("Saved", step=step, path="/tmp/x.safetensors", kind="final")
    say("Finished", step=step, path="/tmp/x.safetensors",
        message=f"Training interrupted at step {step}; saved /tmp/x.safetensors")
""")


@pytest.fixture
def runner(tmp_path):
    runner = JobRunner(Paths(tmp_path).ensure())
    yield runner
    runner.shutdown(timeout=10)


def submit(runner, tmp_path, script: str):
    stop = tmp_path / "job.stop"
    command = [sys.executable, "-c", script, str(stop)]
    return runner.submit("fake", "train", lambda ctx: relay_process(command, ctx, stop)), stop


def wait_for(condition, timeout=60):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_events_are_relayed_and_interrupt_saves_and_stops(runner, tmp_path):
    job, stop = submit(runner, tmp_path, FAKE_TRAINER)
    wait_for(lambda: len(job.snapshot()["losses"]) >= 3)
    assert runner.stop(job.id)
    assert runner.wait(job, timeout=60)
    snap = job.snapshot()
    assert job.state == STOPPED
    assert isinstance(snap["result"], ev.Finished)
    assert snap["result"].message.startswith("Training interrupted at step")
    steps = [s for s, _, _ in snap["losses"]]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] < 500
    assert snap["progress"].step == steps[-1] and snap["previews"][0].path == "/tmp/p.png"
    assert [s.kind for s in snap["saved"]] == ["final"]
    assert "Loading model tiny-demo" in snap["log"] and "a library printed this" in snap["log"]
    assert not stop.exists()  # cleaned up for the next run


def test_a_failed_event_fails_the_job_with_its_message(runner, tmp_path):
    script = ('import json; print(json.dumps({"event": "Failed", "message": "error: '
              'train_data_dir: /x is not a folder"})); raise SystemExit(1)')
    job, _ = submit(runner, tmp_path, script)
    runner.wait(job, timeout=60)
    assert job.state == FAILED
    assert job.result.message == "train_data_dir: /x is not a folder"


def test_a_crash_without_events_fails_the_job_with_its_error_output(runner, tmp_path):
    job, _ = submit(runner, tmp_path, "import sys; sys.stderr.write('boom: no GPU\\n'); sys.exit(3)")
    runner.wait(job, timeout=60)
    assert job.state == FAILED
    assert "exit code 3" in job.result.message and "boom: no GPU" in job.result.message


def test_a_finished_run_is_done(runner, tmp_path):
    script = ('import json; print(json.dumps({"event": "Finished", "step": 4, "message": '
              '"Training finished at step 4"}))')
    job, _ = submit(runner, tmp_path, script)
    runner.wait(job, timeout=60)
    assert job.state == DONE and job.result.message == "Training finished at step 4"


def test_launch_command_and_methods(tmp_path):
    from trainers.launch import accelerate_command, check_processes
    from webui.jobs import job_parts, rebuild
    from trainers.configs import ExtractLoraConfig, LoraConfig
    paths = Paths(tmp_path, confine=True)
    command = accelerate_command("lora", tmp_path / "run.toml", 2, paths, tmp_path / "s.stop")
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2"
    tail = command[command.index("-m", 3):]
    assert tail[:3] == ["-m", "trainers", "lora"] and "--json-events" in tail
    assert tail[tail.index("--stop-file") + 1] == str(tmp_path / "s.stop")
    assert tail[-1] == "--confine-paths"  # a shared app's confinement holds in its processes
    with pytest.raises(ConfigError, match="processes: extract_lora runs in one process"):
        job_parts("extract_lora", ExtractLoraConfig(checkpoint="a", model="b", output_name="c"), 2)
    with pytest.raises(ConfigError, match="processes: must be at least 1"):
        check_processes("lora", 0)
    from trainers.configs import TextualInversionConfig
    whole_images = TextualInversionConfig(model="m", embedding="e", data_root="d", varsize=True)
    with pytest.raises(ConfigError, match="processes: 'do not resize images'"):
        job_parts("textual_inversion", whole_images, 2)
    cfg = LoraConfig(model="tiny-demo", output_name="x", train_data_dir="t").validate()
    name, _, _, spec = job_parts("lora", cfg, 2)
    assert name == "LoRA: x (2 processes)" and spec["processes"] == 2
    assert rebuild(spec)[0] == name  # a queued multi-process job survives a restart as one
