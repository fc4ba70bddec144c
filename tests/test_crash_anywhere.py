"""Crash anywhere, lose nothing: a LoRA run on the tiny model (CPU, saving every step) is killed
with SIGKILL 30 times, one process after another, each resuming what the last one left: inside
a step, inside a save (a file written, not yet moved), between the model file and its sidecar,
between the moves that put the pair in place, inside a preview, and at random times after a
progress event. After each kill, every file under a final name loads; after the recovery that
every start runs, the model file and its .optim sidecar are one pair of the step last saved (or
of the step being saved), with no temporary file left; and the last run, uninterrupted, ends
with the same final loss and the same weights as a run that was never killed.

The runs are forked from one process that imported torch and loaded the model once
(tests/crash_server.py); a fresh interpreter per kill would spend most of the test importing."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
from PIL import Image

from tests.conftest import ROOT, photo
from trainers.formats.lora import load_lora
from trainers.formats.optim_sidecar import optim_path, recover_pair
from trainers.formats.safe_load import safe_torch_load

KILLS = 30
# more than 30 killed runs reach: each place is reached within two steps of a run's start, and a
# timed kill comes before the run's third step (on a quiet machine a step takes milliseconds)
STEPS = 70
TIMED_MAX_STEPS = 3
SEED = int(os.environ.get("DANLU_CRASH_SEED", "2026"))
# where each run is killed, and the most times the place is reached first: a save writes the
# periodic copy, the model file, the sidecar and the journal (each an atomic write)
COUNTS = {"step": 2, "atomic-write:written": 4, "save:between-file-and-sidecar": 2,
          "together:between-moves": 2, "preview": 1, "timed": 1}
PLACES = list(COUNTS)


class Server:
    def __init__(self, data: Path, config: dict, log: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.crash_server", str(data), json.dumps(config)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
            env=env)
        assert self._reply().get("ready"), self._diagnosis()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {}

    def _diagnosis(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def start(self, settings: dict, events: Path, kill_at=None) -> int:
        self.proc.stdin.write(json.dumps({"set": settings, "events": str(events),
                                          "kill_at": kill_at}) + "\n")
        self.proc.stdin.flush()
        return self._reply()["pid"]

    def ended(self) -> dict:
        reply = self._reply()
        assert reply, self._diagnosis()
        return reply

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)
        self.log.close()


def read_events(path: Path) -> list[dict]:
    events = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            events.append(json.loads(line))
        except ValueError:  # the last line, cut by the kill
            pass
    return events


def progress_count(path: Path) -> int:
    return sum(e.get("event") == "Progress" for e in read_events(path))


def file_step(path: Path) -> int | None:
    return int(load_lora(path)[1]["ss_steps"]) if path.exists() else None


def check_disk(lora: Path, outputs: Path, saved: int | None, progressed: int | None) -> int | None:
    """The state after a kill: returns the step the pair holds (None: no file yet)."""
    sidecar = optim_path(lora)
    # before any recovery: whatever is under a final name is whole
    if lora.exists():
        load_lora(lora)
    if sidecar.exists():
        safe_torch_load(sidecar)
    for image in outputs.rglob("*.png"):
        with Image.open(image) as opened:
            opened.load()
    for copy in outputs.rglob("*.safetensors"):
        safetensors.torch.load_file(str(copy))
    for settings in outputs.rglob("settings-*.json"):
        json.loads(settings.read_text())
    for log in outputs.rglob("loss.csv"):  # complete rows (a last one cut off is dropped later)
        rows = log.read_text().split("\n")[:-1]
        assert all(row.count(",") == 4 for row in rows), log.read_text()[-300:]
    recover_pair(lora)  # what the next start does first
    leftovers = [p.name for p in lora.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left after recovery: {leftovers}"
    if not lora.exists():
        assert saved is None and not sidecar.exists()
        return None
    state, metadata = load_lora(lora)
    step = int(metadata["ss_steps"])
    payload = safe_torch_load(sidecar)
    assert payload["danlu"]["step"] == step, "the file and its sidecar are of different steps"
    assert payload["hash"] == metadata["sshs_model_hash"], "the sidecar belongs to another file"
    allowed = {saved, progressed}
    assert step in allowed, f"the pair is of step {step}; saved {saved}, progressed {progressed}"
    return step


def test_thirty_kills_lose_nothing_and_the_run_ends_as_an_uninterrupted_one(tmp_path,
                                                                            tiny_model_dir):
    began = time.monotonic()
    rng = random.Random(SEED)
    images = tmp_path / "train" / "1_zxq"
    images.mkdir(parents=True)
    for i in range(2):
        photo(i).save(images / f"img{i}.png")
        (images / f"img{i}.txt").write_text("zxq, a photo")
    data = tmp_path / "data"
    shutil.copytree(tiny_model_dir, data / ".cache" / "tiny-demo")
    config = dict(model="tiny-demo", train_data_dir=str(images.parent), resolution=32,
                  min_bucket_reso=32, max_bucket_reso=64, bucket_reso_steps=16, network_dim=2,
                  network_alpha=1.0, network_train_unet_only=True, learning_rate=1e-3, seed=11,
                  save_precision="fp16",
                  save_every_n_steps=1, sample_every_n_steps=2, max_train_steps=STEPS,
                  sample_prompts="zxq --w 32 --h 32 --s 1 --d 5", sample_at_first=False)
    lora = data / "models" / "Lora" / "crash.safetensors"
    outputs = data / "outputs"
    server = Server(data, config, tmp_path / "server.log")
    try:
        places = [PLACES[i % len(PLACES)] for i in range(KILLS)]
        rng.shuffle(places)
        survived, log = 0, []
        for number, place in enumerate(places, 1):
            before = file_step(lora)
            events = tmp_path / f"kill-{number}.jsonl"
            count = rng.randint(1, COUNTS[place])
            pid = server.start({"output_name": "crash"}, events,
                               None if place == "timed" else [place, count])
            if place == "timed":
                deadline = time.monotonic() + 60
                while progress_count(events) < 1 and time.monotonic() < deadline:
                    time.sleep(0.005)
                until = time.monotonic() + rng.uniform(0, 0.4)
                while time.monotonic() < until and progress_count(events) < TIMED_MAX_STEPS:
                    time.sleep(0.002)
                os.kill(pid, signal.SIGKILL)
            ended = server.ended()
            happened = read_events(events)
            assert ended == {"signal": signal.SIGKILL}, \
                (f"kill {number} ({place} #{count}, seed {SEED}) did not happen: {ended}, "
                 f"{happened[-3:]}")
            saves = [e["step"] for e in happened if e.get("event") == "Saved"
                     and e.get("path") == str(lora)]
            steps = [e["step"] for e in happened if e.get("event") == "Progress"]
            saved = saves[-1] if saves else before
            progressed = steps[-1] if steps else before
            held = check_disk(lora, outputs, saved, progressed)
            survived += 1
            log.append(f"{place} #{count}: progressed to {progressed}, pair of step {held}")
        assert (file_step(lora) or 0) < STEPS - 2, log

        finish, reference = tmp_path / "finish.jsonl", tmp_path / "reference.jsonl"
        server.start({"output_name": "crash"}, finish)
        assert server.ended() == {"exit": 0}, read_events(finish)[-3:]
        server.start({"output_name": "reference"}, reference)  # never interrupted
        assert server.ended() == {"exit": 0}, read_events(reference)[-3:]
    finally:
        server.close()
    resumed = [e for e in read_events(finish) if e.get("event") == "Progress"]
    expected = [e for e in read_events(reference) if e.get("event") == "Progress"]
    assert resumed[-1]["step"] == expected[-1]["step"] == STEPS
    assert resumed[-1]["loss"] == expected[-1]["loss"], \
        f"final loss {resumed[-1]['loss']} != {expected[-1]['loss']} uninterrupted"
    for got, want in zip(resumed, expected[-len(resumed):]):
        assert got["loss"] == want["loss"], f"step {got['step']}: {got} != {want}"
    ours, theirs = load_lora(lora)[0], load_lora(lora.with_name("reference.safetensors"))[0]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    print(f"crash test: {survived}/{KILLS} kills survived (seed {SEED}) in "
          f"{time.monotonic() - began:.0f} s; " + "; ".join(log))
