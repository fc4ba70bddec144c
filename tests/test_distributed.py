"""Data-parallel training: shards of a global batch, and a real 2-process `accelerate launch` on
the CPU (gloo) that must repeat a one-process run with the doubled batch, with one writer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from core import events as ev
from tests.browser_support import free_port
from tests.conftest import ROOT, RecordingContext, photo
from trainers.distributed import shard_of


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_shards_cover_the_batch_once_and_weigh_to_its_mean(processes):
    values = torch.arange(1.0, 8.0) ** 2
    for size in range(1, 8):
        shards = [shard_of(size, processes, index) for index in range(processes)]
        covered = [row for s in shards if s.scale for row in range(size)[s.rows]]
        assert covered == list(range(size))
        # what DDP averages: each process's scaled mean; together the mean of the whole batch
        mean = sum(s.scale * values[:size][s.rows].mean() for s in shards) / processes
        assert torch.isclose(mean, values[:size].mean())


def test_shard_losses_average_to_the_whole_batch_loss(tiny_model_dir):
    """The step draws noise and timesteps for the whole batch and slices them, so shards'
    losses add up to exactly what one process computes for the batch."""
    import json

    from diffusers import UNet2DConditionModel
    from trainers import seeds
    from trainers.objectives import NoisePrediction
    from trainers.step import diffusion_loss
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    scheduler = NoisePrediction(json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text()))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(3, 77, unet.config.cross_attention_dim,
                          generator=torch.Generator().manual_seed(2))
    options = dict(min_snr_gamma=5.0, noise_offset=0.1)
    with torch.no_grad():
        whole = diffusion_loss(unet, scheduler, latents, context, seeds.generator(0, "n", 5),
                               **options)
        parts = []
        for index in range(2):
            shard = shard_of(3, 2, index)
            parts.append(shard.scale * diffusion_loss(
                unet, scheduler, latents[shard.rows], context[shard.rows],
                seeds.generator(0, "n", 5), rows=shard.rows, batch_size=3, **options))
    assert torch.isclose(sum(parts) / 2, whole, rtol=1e-5)


def test_events_survive_json_lines():
    events = [ev.Status("hi"), ev.Progress(step=3, total=9, loss=0.25, learn_rate=1e-4, epoch=1,
                                           epoch_step=2, start_step=1, elapsed=2.5),
              ev.Preview(step=3, path="/a.png", caption="c"), ev.Saved(step=3, path="/b"),
              ev.Finished(step=3, path="/b", message="done"), ev.Failed(message="bad")]
    assert [ev.from_json(ev.to_json(e)) for e in events] == events
    assert ev.from_json("not json") is None and ev.from_json('{"event": "Nope"}') is None
    assert ev.from_json('{"event": "Progress", "step": 1}') is None  # fields missing


WRITES_HOOK = """
import os, sys
_rank, _root = os.environ.get("RANK"), os.environ.get("DANLU_AUDIT_ROOT")
if _rank is not None and _root:
    _log = os.path.join(os.environ["DANLU_AUDIT_LOG"], f"writes-{_rank}.txt")
    def _hook(event, args):
        if event == "open" and isinstance(args[0], str) and args[0].startswith(_root):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (flags and flags & (os.O_WRONLY | os.O_RDWR)):
                with open(_log, "a") as handle:
                    handle.write(args[0] + "\\n")
        elif event == "os.rename" and str(args[1]).startswith(_root):
            with open(_log, "a") as handle:
                handle.write(str(args[1]) + "\\n")
    sys.addaudithook(_hook)
"""


@pytest.fixture
def mixed_buckets(tmp_path):
    """3 square and 2 wide images: with a global batch of 2, the square bucket ends in a batch
    of one image, where the second process has no row of its own."""
    sub = tmp_path / "train" / "1_zxq cat"
    sub.mkdir(parents=True)
    for i, size in enumerate([(64, 64)] * 3 + [(96, 64)] * 2):
        photo(i, 96).resize(size).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text(f"zxq cat, photo {i}")
    return tmp_path / "train"


SETTINGS = dict(model="tiny-demo", output_name="dp", resolution=64, min_bucket_reso=32,
                max_bucket_reso=128, bucket_reso_steps=16, network_dim=4, network_alpha=2.0,
                max_train_steps=4, gradient_accumulation_steps=2, save_every_n_epochs=0,
                save_every_n_steps=2, sample_every_n_steps=2, sample_at_first=False,
                sample_prompts="zxq cat --w 64 --h 64 --s 2 --d 3", learning_rate=2e-3, seed=7,
                save_precision="fp32", shuffle_caption=True)


def test_two_processes_repeat_one_process_with_the_doubled_batch(tmp_path, data_paths,
                                                                  mixed_buckets):
    """One process trains step 1 (batch 2); two processes continue the file to step 4 (batch 1
    each); the result matches one process training 4 steps with batch 2."""
    from core.config import to_toml
    from core.paths import Paths
    from trainers.configs import LoraConfig
    from trainers.formats.lora import load_lora
    from trainers.methods.lora import run
    import shutil

    two = Paths(tmp_path / "two").ensure()
    shutil.copytree(data_paths.cache / "tiny-demo", two.cache / "tiny-demo")
    run(LoraConfig(**{**SETTINGS, "max_train_steps": 1}, train_data_dir=str(mixed_buckets),
                   train_batch_size=2).validate(), RecordingContext(two))
    config = tmp_path / "run.toml"
    config.write_text(to_toml(LoraConfig(**SETTINGS, train_data_dir=str(mixed_buckets),
                                         train_batch_size=1)))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(WRITES_HOOK))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hook), str(ROOT)]),
               DANLU_AUDIT_ROOT=str(two.data_dir), DANLU_AUDIT_LOG=str(hook), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
         "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "trainers", "lora", "--config",
         str(config), "--data-dir", str(two.data_dir), "--json-events"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    # one process (the main one) printed events and wrote every file
    events = [ev.from_json(line) for line in out.stdout.splitlines()]
    assert None not in events, out.stdout
    assert "Resuming at step 1 with the saved optimizer state" in [
        e.text for e in events if isinstance(e, ev.Status)]
    assert (hook / "writes-0.txt").exists() and not (hook / "writes-1.txt").exists()
    run_dir = next((two.outputs / "lora").glob("*/dp"))
    assert (run_dir / "loss.csv").read_text().count("\n") == 1 + 1 + 3  # steps 1, then 2-4
    assert json.loads((run_dir / "settings-1.json").read_text())["processes"] == 2
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == ["dp-2.png", "dp-4.png"]
    assert [e.step for e in events if isinstance(e, ev.Preview)] == [2, 4]

    # one process, batch 2, all four steps
    ctx = RecordingContext(data_paths)
    single = run(LoraConfig(**SETTINGS, train_data_dir=str(mixed_buckets),
                            train_batch_size=2).validate(), ctx)
    losses = [e.loss for e in events if isinstance(e, ev.Progress)]
    assert [e.step for e in events if isinstance(e, ev.Progress)] == [2, 3, 4]
    assert losses == pytest.approx(ctx.losses[1:], rel=1e-4)
    mine, _ = load_lora(two.lora / "dp.safetensors")
    theirs, _ = load_lora(single)
    assert mine.keys() == theirs.keys()
    # Adam divides by the root of tiny second moments, which turns last-bit differences of
    # batch-split arithmetic into ~1e-5: far below what training moved (up-projections start
    # at zero and reach ~8e-3 = 4 steps x lr)
    tolerance = 1e-4
    for key in theirs:
        assert torch.allclose(mine[key], theirs[key], rtol=1e-3, atol=tolerance), key
    assert max(theirs[k].abs().max() for k in theirs if k.endswith("lora_up.weight")) > 20 * tolerance


def test_extract_lora_refuses_several_processes(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0")
    out = subprocess.run([sys.executable, "-m", "trainers", "extract_lora", "--set",
                          "checkpoint=a", "--set", "model=b", "--set", "output_name=c"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "extract_lora runs in one process" in out.stderr
