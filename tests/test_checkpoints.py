"""Run history, checkpoint lists, "Use this checkpoint" and the compare grid, on runs the real
trainers write (tiny model, a few steps)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from core.config import ConfigError
from core.paths import Paths
from tests.conftest import ROOT, RecordingContext, photo
from trainers import checkpoint_use as cu
from trainers import runs as rn
from trainers.compare import CompareSpec, read_grid_labels, render_grid, spec_for_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A data folder with a finished LoRA run (copy at step 2, final at 4, a preview at 4)
    and a textual-inversion run interrupted at step 3 (copy at 2)."""
    from trainers.configs import CreateEmbeddingConfig, LoraConfig, TextualInversionConfig
    from trainers.embeddings import create_embedding
    from trainers.registry import runner

    root = tmp_path_factory.mktemp("checkpoints")
    paths = Paths(root / "data").ensure()
    shutil.copytree(tiny_model_dir, paths.cache / "tiny-demo")
    images = root / "train" / "2_zxq cat"
    images.mkdir(parents=True)
    for i in range(2):
        photo(i).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("zxq cat")
    lora = LoraConfig(model="tiny-demo", output_name="mylora", train_data_dir=str(images.parent),
                      resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                      bucket_reso_steps=16, network_dim=4, network_alpha=4.0, max_train_steps=4,
                      save_every_n_epochs=0, save_every_n_steps=2, sample_every_n_steps=4,
                      sample_at_first=False, sample_prompts="zxq cat --w 64 --h 64 --s 1 --d 3",
                      learning_rate=2e-2, seed=7, save_precision="fp32").validate()
    runner("lora")(lora, RecordingContext(paths))
    create_embedding(CreateEmbeddingConfig(name="zxqtok", init_text="cat", vectors_per_token=2,
                                           model="tiny-demo").validate(), paths)
    ti = TextualInversionConfig(model="tiny-demo", embedding="zxqtok", data_root=str(images),
                                width=64, height=64, steps=8, save_every=2, preview_every=0,
                                template="subject_filewords.txt", learn_rate="0.005",
                                seed=3).validate()
    runner("textual_inversion")(ti, RecordingContext(paths, stop_after=3))
    return paths


def by_method(paths):
    return {run.method: run for run in rn.scan_runs(paths)}


def test_checkpoint_list_matches_the_files_on_disk(trained):
    runs = by_method(trained)
    lora = runs["lora"]
    copies = sorted(p.name for p in (lora.root / "checkpoints").iterdir())
    assert copies == ["mylora-2.safetensors"]
    assert [(c.step, c.final, c.path.name) for c in lora.checkpoints] == \
        [(2, False, "mylora-2.safetensors"), (4, True, "mylora.safetensors")]
    assert lora.checkpoints[1].path == trained.lora / "mylora.safetensors"
    assert [[p.name for p in c.previews] for c in lora.checkpoints] == [[], ["mylora-4.png"]]
    logged = dict((s, loss) for s, loss, _ in lora.losses)
    assert sorted(logged) == [1, 2, 3, 4]
    first = lora.checkpoints[0]
    a, b = first.loss_steps
    assert first.loss == pytest.approx(np.mean([logged[s] for s in range(a, b + 1)]))
    assert (lora.status, lora.steps, lora.target_steps) == ("finished", 4, 4)
    assert lora.model == "tiny-demo" and lora.dataset.endswith("train") and lora.images == 4
    assert lora.final_loss == pytest.approx(np.mean(list(logged.values())))
    assert lora.duration >= 0 and lora.ended >= lora.started

    ti = runs["textual_inversion"]
    assert (ti.status, ti.steps, ti.target_steps) == ("interrupted", 3, 8)
    assert [(c.step, c.final) for c in ti.checkpoints] == [(2, False), (3, True)]

    # the list follows the disk: a deleted copy disappears, stray files are ignored
    extra = lora.root / "checkpoints"
    (extra / "other-6.safetensors").write_bytes(b"x")
    (extra / "mylora-x.safetensors").write_bytes(b"x")
    (extra / "mylora-2.safetensors.optim").write_bytes(b"x")
    saved = (extra / "mylora-2.safetensors").read_bytes()
    (extra / "mylora-2.safetensors").unlink()
    try:
        assert [c.key for c in by_method(trained)["lora"].checkpoints] == ["4-final"]
    finally:
        (extra / "mylora-2.safetensors").write_bytes(saved)
        for name in ("other-6.safetensors", "mylora-x.safetensors", "mylora-2.safetensors.optim"):
            (extra / name).unlink()
    assert [c.key for c in by_method(trained)["lora"].checkpoints] == ["2", "4-final"]


def test_status_failed_when_the_final_file_lags_the_log_and_steps_read_without_torch(
        trained, tmp_path):
    import torch
    ti = by_method(trained)["textual_inversion"]
    # torch-free step reading: legacy (what Danlu writes) and zip .pt, safetensors headers
    assert rn.file_step(ti.final_path) == 3
    zipped = tmp_path / "zip.pt"
    torch.save({"step": 17, "string_to_param": {"*": torch.zeros(1, 4)}}, zipped)
    assert rn.pickled_fields(zipped, ("step",)) == {"step": 17}
    assert rn.file_step(trained.lora / "mylora.safetensors") == 4

    # a run whose log goes further than its final file: it ended without the final save
    folder = trained.outputs / "textual_inversion" / "2001-01-01" / "crashed"
    folder.mkdir(parents=True)
    final = trained.embeddings / "crashed.pt"
    shutil.copy(ti.final_path, final)  # holds step 3
    settings = {"method": "textual_inversion", "model": "tiny-demo", "embedding": str(final),
                "config": {"steps": 10, "learn_rate": "0.005", "data_root": "x"}}
    (folder / "settings-0.json").write_text(json.dumps(settings))
    rows = "".join(f"{s},0,{s},0.5,0.005\n" for s in range(1, 6))
    (folder / "textual_inversion_loss.csv").write_text("step,epoch,epoch_step,loss,learn_rate\n" + rows)
    try:
        crashed = rn.load_run(trained, "textual_inversion/2001-01-01/crashed")
        assert crashed.status == "failed" and "without a final save" in crashed.status_note
        assert [c.key for c in crashed.checkpoints] == ["3-final"]  # its last good save
        running = rn.load_run(trained, crashed.id, running=[folder])
        assert running.status == "running"
    finally:
        shutil.rmtree(folder)
        final.unlink()


def test_use_checkpoint_copies_atomically_and_never_overwrites_silently(trained, monkeypatch):
    lora = by_method(trained)["lora"]
    step2, final = lora.checkpoints
    target = cu.use_checkpoint(trained, lora, step2, "picked")
    assert target == trained.lora / "picked.safetensors"
    assert target.read_bytes() == step2.path.read_bytes()
    assert not target.with_name("picked.safetensors.optim").exists()  # copies have no optimizer state

    with pytest.raises(cu.CheckpointExists, match="already exists"):
        cu.use_checkpoint(trained, lora, final, "picked")
    assert target.read_bytes() == step2.path.read_bytes()
    with pytest.raises(ConfigError, match="path characters"):
        cu.use_checkpoint(trained, lora, final, "../escape")

    # a copy that breaks half-way leaves the old file and no temporary file behind
    def broken(source, out, length=0):
        out.write(source.read(10))
        raise OSError("disk full")
    monkeypatch.setattr(cu.shutil, "copyfileobj", broken)
    with pytest.raises(OSError, match="disk full"):
        cu.use_checkpoint(trained, lora, final, "picked", overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        cu.use_checkpoint(trained, lora, final, "fresh")
    monkeypatch.undo()
    assert target.read_bytes() == step2.path.read_bytes()
    assert not (trained.lora / "fresh.safetensors").exists()
    assert sorted(p.name for p in trained.lora.iterdir() if p.name.startswith(".")) == []

    # confirmed: replaced in one step; the final file brings its optimizer state along
    assert cu.use_checkpoint(trained, lora, final, "picked", overwrite=True) == target
    assert target.read_bytes() == final.path.read_bytes()
    assert target.with_name("picked.safetensors.optim").read_bytes() == \
        final.path.with_name("mylora.safetensors.optim").read_bytes()

    # embeddings go to embeddings/, and a same-named file of another suffix counts as taken
    ti = by_method(trained)["textual_inversion"]
    (trained.embeddings / "tok2.safetensors").write_bytes(b"old")
    with pytest.raises(cu.CheckpointExists, match="tok2.safetensors"):
        cu.use_checkpoint(trained, ti, ti.checkpoints[0], "tok2")
    made = cu.use_checkpoint(trained, ti, ti.checkpoints[0], "tok2", overwrite=True)
    assert made == trained.embeddings / "tok2.pt" and not (trained.embeddings / "tok2.safetensors").exists()
    from trainers.formats.embedding import load_embedding
    assert load_embedding(made).step == 2


def test_grid_of_two_checkpoints_by_two_strengths_is_labelled_and_deterministic(trained, tmp_path):
    from tests.test_textual_inversion import module_digest
    from trainers.models import load_model
    lora = by_method(trained)["lora"]
    spec = spec_for_run(lora, ["4-final", "2"], "0.5, 1", "zxq cat", "3", steps=1)
    assert [label for label, _ in spec.checkpoints] == ["step 2", "step 4 (final)"]
    unet = module_digest(load_model(trained, "tiny-demo").unet)

    first = render_grid(spec, trained, cache_dir=tmp_path / "cache-a")
    rows = ["step 2 · strength 0.5", "step 2 · strength 1",
            "step 4 (final) · strength 0.5", "step 4 (final) · strength 1"]
    assert first.row_labels == rows and first.column_labels == ["zxq cat · seed 3"]
    assert (first.rendered, first.cached) == (4, 0)
    assert first.path.parent == trained.outputs / "grids"
    assert read_grid_labels(first.path)["rows"] == rows
    grid = np.asarray(Image.open(first.path).convert("RGB"))
    assert grid.shape[0] > 4 * 64 and grid.shape[1] > 64
    assert module_digest(load_model(trained, "tiny-demo").unet) == unet  # LoRA taken out again

    # the cells really differ by strength and checkpoint, and the grid repeats exactly
    cache = sorted((tmp_path / "cache-a").glob("*.png"))
    cells = {p.name: np.asarray(Image.open(p)) for p in cache}
    assert len(cells) == 4 and len({c.tobytes() for c in cells.values()}) == 4
    grid_bytes = first.path.read_bytes()
    again = render_grid(spec, trained, cache_dir=tmp_path / "cache-b")  # rendered anew
    assert again.rendered == 4 and again.path == first.path
    assert again.path.read_bytes() == grid_bytes
    cached = render_grid(spec, trained, cache_dir=tmp_path / "cache-a")  # from the cache
    assert (cached.rendered, cached.cached) == (0, 4) and cached.path.read_bytes() == grid_bytes


def test_compare_form_errors_name_the_field(trained):
    lora = by_method(trained)["lora"]
    with pytest.raises(ConfigError, match="seeds"):
        spec_for_run(lora, ["2"], "1", "zxq cat", "-1")
    with pytest.raises(ConfigError, match="strengths"):
        spec_for_run(lora, ["2"], "strong", "zxq cat", "1")
    with pytest.raises(ConfigError, match="prompts: --w"):
        spec_for_run(lora, ["2"], "1", "zxq cat --w 64", "1")
    with pytest.raises(ConfigError, match="checkpoints"):
        spec_for_run(lora, [], "1", "zxq cat", "1")
    with pytest.raises(ConfigError, match="no longer exist"):
        spec_for_run(lora, ["99"], "1", "zxq cat", "1")
    ti = by_method(trained)["textual_inversion"]
    spec = spec_for_run(ti, ["2", "3-final"], "0.5, 1", "zxqtok --n blurry", "1, 2")
    assert spec.row_labels() == ["step 2", "step 3 (final)"]  # embeddings have no strength
    assert spec.column_labels() == ["zxqtok · seed 1", "zxqtok · seed 2"]
    assert spec.columns()[0] == ("zxqtok", "blurry", 1)
    with pytest.raises(ConfigError, match="400"):
        CompareSpec(method="lora", model="tiny-demo", token="x", checkpoints=[("a", "b")] * 50,
                    prompts=["p"], seeds=list(range(10))).validate()


def test_history_lists_runs_written_by_an_earlier_process(trained):
    """A fresh process (an app started later) lists the runs from disk, in the Checkpoints
    tab too, without importing torch."""
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1])\n"
        "from pathlib import Path\n"
        "import gradio as gr\n"
        "from core.jobs import JobRunner\n"
        "from core.paths import Paths\n"
        "from webui import tab_checkpoints\n"
        "paths = Paths(Path(sys.argv[2]))\n"
        "with gr.Blocks():\n"
        "    parts = tab_checkpoints.build(paths, JobRunner(paths))\n"
        "frame = parts['restore'][0]()[1]\n"
        "print(json.dumps(frame.values.tolist()))\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not bad, bad\n")
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(trained.data_dir)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    table = {row[1]: row for row in rows}
    assert table["mylora"][2:4] == ["LoRA", "tiny-demo"]
    assert table["mylora"][5] == "4/4" and table["mylora"][-1] == "finished"
    assert table["zxqtok"][2] == "Textual inversion" and table["zxqtok"][5] == "3/8"
    assert table["zxqtok"][-1] == "interrupted"


def test_resume_queues_the_run_again_and_it_continues_from_its_file(trained, tmp_path):
    from core.jobs import JobRunner
    from webui.tab_checkpoints import queue_resume
    shutil.copytree(trained.data_dir, tmp_path / "data")  # a copied data folder works too
    paths = Paths(tmp_path / "data")
    runs = by_method(paths)
    assert runs["textual_inversion"].final_path == paths.embeddings / "zxqtok.pt"
    with pytest.raises(ValueError, match="finished"):
        queue_resume(paths, JobRunner(paths), runs["lora"])
    runner = JobRunner(paths)
    job = queue_resume(paths, runner, runs["textual_inversion"])
    assert runner.wait(job, 120) and job.state == "done", job.snapshot()["log"]
    ti = by_method(paths)["textual_inversion"]  # the same folder: a second session
    assert [s.start_step for s in ti.sessions] == [0, 3]
    assert (ti.status, ti.steps, ti.final_step) == ("finished", 8, 8)
    assert [c.key for c in ti.checkpoints] == ["2", "4", "6", "8-final"]
