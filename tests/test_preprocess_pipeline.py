"""The Preprocess job end to end: config validation, run(), events, outputs, the CLI."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import events as ev
from core.config import ConfigError, from_dict, load_toml, to_toml
from core.paths import Paths
from preprocess import PreprocessConfig, captioners, run
from preprocess.pipeline import combine_caption
from tests.conftest import ROOT, photo


class Ctx:
    def __init__(self, data_dir: Path, stop_after: int | None = None):
        self.paths = Paths(data_dir)
        self.events: list = []
        self.stop_after = stop_after

    def emit(self, event):
        self.events.append(event)

    def should_stop(self):
        done = sum(isinstance(e, ev.Progress) for e in self.events)
        return self.stop_after is not None and done >= self.stop_after

    def of(self, kind):
        return [e for e in self.events if isinstance(e, kind)]


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            stat = path.stat()
            digest.update(path.read_bytes())
            digest.update(f"{stat.st_mtime_ns}:{stat.st_mode}".encode())
    return digest.hexdigest()


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    photo(0, 96).save(folder / "a-square.png")
    photo(1, 200).resize((300, 120)).save(folder / "b-wide.jpg", quality=95)
    photo(2, 200).resize((90, 240)).save(folder / "c-tall.png")
    (folder / "b-wide.txt").write_text("a wide photo, cup on the left\n", encoding="utf-8")
    return folder


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".png")


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,field", [
    (dict(source=""), "source"),
    (dict(source="missing-folder"), "source"),
    (dict(destination=""), "destination"),
    (dict(destination="SRC"), "destination"),
    (dict(destination="SRC/inner/out"), "destination"),
    (dict(width=500), "width"),
    (dict(height=4096), "height"),
    (dict(width=32), "width"),
    (dict(split_threshold=1.5), "split_threshold"),
    (dict(overlap_ratio=-0.1), "overlap_ratio"),
    (dict(focal_face_weight=2.0), "focal_face_weight"),
    (dict(deepbooru_threshold=-0.5), "deepbooru_threshold"),
    (dict(wd14_general_threshold=1.01), "wd14_general_threshold"),
    (dict(multicrop_threshold=3.0), "multicrop_threshold"),
    (dict(captioners=["blip", "clip"]), "captioners"),
    (dict(existing_caption="merge"), "existing_caption"),
    (dict(multicrop_min_dim=768, multicrop_max_dim=512), "multicrop_max_dim"),
])
def test_validation_names_the_field(tmp_path, src, changes, field):
    values = dict(source=str(src), destination=str(tmp_path / "out"))
    values.update({k: (v.replace("SRC", str(src)) if isinstance(v, str) else v)
                   for k, v in changes.items()})
    with pytest.raises(ConfigError) as info:
        PreprocessConfig(**values).validate()
    assert any(p.startswith(f"{field}:") for p in info.value.problems), info.value.problems


def test_validation_accepts_good_settings_and_relative_paths(tmp_path, src):
    cfg = PreprocessConfig(source="raw", destination="out", captioners=["wd14", "blip"])
    got_src, got_dst = cfg.validate(Paths(tmp_path))
    assert got_src == src and got_dst == tmp_path / "out"


def test_confined_paths_refuse_folders_outside_the_data_dir(tmp_path, src):
    cfg = PreprocessConfig(source=str(src), destination="/tmp/elsewhere")
    with pytest.raises(ConfigError, match="destination"):
        cfg.validate(Paths(tmp_path, confine=True))


def test_combine_caption_follows_a1111():
    assert combine_caption("a cat", "sks", "ignore") == "a cat"
    assert combine_caption("a cat", "sks", "copy") == "sks"
    assert combine_caption("a cat", "sks", "prepend") == "sks a cat"
    assert combine_caption("a cat", "sks", "append") == "a cat sks"
    assert combine_caption("", "sks", "prepend") == "sks"
    assert combine_caption("a cat", None, "copy") == "a cat"


# --- run ----------------------------------------------------------------------------------------

def test_default_run_resizes_names_and_leaves_the_source_alone(tmp_path, src):
    before = folder_digest(src)
    ctx = Ctx(tmp_path)
    summary = run(PreprocessConfig(source=str(src), destination=str(tmp_path / "out"),
                                   width=64, height=64), ctx)
    assert folder_digest(src) == before
    out = tmp_path / "out"
    assert outputs(out) == ["00000-0-a-square.png", "00001-0-b-wide.png", "00002-0-c-tall.png"]
    assert all(Image.open(out / n).size == (64, 64) for n in outputs(out))
    assert not list(out.glob("*.txt"))  # "ignore" and no captioner: no caption files
    assert summary.processed == summary.total == 3 and not summary.skipped
    # events: progress per file, a preview per written image, finished with the summary
    progress = ctx.of(ev.Progress)
    assert [(p.step, p.total) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    assert [Path(p.path).name for p in ctx.of(ev.Preview)] == outputs(out)
    finished = ctx.of(ev.Finished)
    assert len(finished) == 1 and "3 of 3" in finished[0].message


def test_flip_copy_and_swap_left_right(tmp_path, src):
    cfg = PreprocessConfig(source=str(src), destination=str(tmp_path / "out"), width=64,
                           height=64, flip=True, existing_caption="copy",
                           flip_swap_left_right=True)
    summary = run(cfg, Ctx(tmp_path))
    out = tmp_path / "out"
    assert len(summary.written) == 6
    original, flipped = out / "00001-0-b-wide.png", out / "00001-1-b-wide.png"
    assert np.array_equal(np.asarray(Image.open(flipped)),
                          np.asarray(Image.open(original))[:, ::-1])
    assert (out / "00001-0-b-wide.txt").read_text() == "a wide photo, cup on the left"
    assert (out / "00001-1-b-wide.txt").read_text() == "a wide photo, cup on the right"
    assert not (out / "00000-0-a-square.txt").exists()  # no caption for a-square
    cfg.flip_swap_left_right = False
    run(cfg, Ctx(tmp_path))
    assert (out / "00001-1-b-wide.txt").read_text() == "a wide photo, cup on the left"


def test_split_focal_multicrop_and_original_in_one_run(tmp_path, src):
    cfg = PreprocessConfig(source=str(src), destination=str(tmp_path / "out"), width=64,
                           height=64, split=True, focal_crop=True, focal_debug=True,
                           multicrop=True, multicrop_min_dim=64, multicrop_max_dim=256,
                           multicrop_max_area=256 * 256, multicrop_threshold=0.1,
                           keep_original_size=True)
    summary = run(cfg, Ctx(tmp_path))
    out = tmp_path / "out"
    sizes = {n: Image.open(out / n).size for n in outputs(out)}
    wide = sorted(n for n in sizes if "b-wide" in n)
    # b-wide (300x120, ratio 0.4): split pieces, a focal crop, no auto size within 0.1, original
    pieces = [n for n in wide if sizes[n] == (64, 64)]
    assert len(pieces) >= 3
    assert sizes[wide[-1]] == (300, 120)
    assert any("b-wide" in note for note in summary.notes)
    # a-square: no split, no focal crop (already square), an auto-sized crop and the original
    square = sorted(n for n in sizes if "a-square" in n)
    assert [sizes[n] for n in square] == [(256, 256), (96, 96)]
    assert len(summary.debug_images) == 2  # b-wide and c-tall, not in the dataset
    assert all(Path(p).parent.name == "debug" for p in summary.debug_images)


def test_bad_inputs_are_skipped_and_named(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    photo(0, 80).save(folder / "good.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    photo(1, 80).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(80 * 80).reshape(80, 80) * 10).astype(np.uint16)).save(
        folder / "deep16.png")
    (folder / "notes.md").write_text("# not an image")
    (folder / ".DS_Store").write_bytes(b"\0\0")
    summary = run(PreprocessConfig(source=str(folder), destination=str(tmp_path / "out"),
                                   width=64, height=64, flip=True), Ctx(tmp_path))
    assert summary.total == 5 and summary.processed == 3
    assert len(summary.written) == 6
    assert sorted(name for name, _ in summary.skipped) == ["corrupt.jpg", "notes.md"]
    assert "corrupt.jpg" in summary.text() and "notes.md" in summary.text()
    names = outputs(tmp_path / "out")
    assert {n.split("-", 2)[2] for n in names} == {"cmyk.png", "deep16.png", "good.png"}
    deep = np.asarray(Image.open(tmp_path / "out" / next(n for n in names if "deep16" in n)))
    assert 40 < deep.mean() < 215  # scaled from 16 bits, not clipped to white


def test_unicode_names_and_alpha_kept_as_mask(tmp_path):
    folder = tmp_path / "源"
    folder.mkdir()
    rgba = photo(2, 64).convert("RGBA")
    alpha = Image.new("L", (64, 64), 0)
    alpha.paste(255, (16, 16, 48, 48))
    rgba.putalpha(alpha)
    rgba.save(folder / "猫 ü.png")
    out = tmp_path / "出力"
    run(PreprocessConfig(source=str(folder), destination=str(out), width=64, height=64,
                         alpha="keep"), Ctx(tmp_path))
    saved = Image.open(out / "00000-0-猫 ü.png")
    assert saved.mode == "RGBA"
    assert np.asarray(saved.getchannel("A"))[32, 32] == 255
    assert np.asarray(saved.getchannel("A"))[2, 2] == 0
    run(PreprocessConfig(source=str(folder), destination=str(out), width=64, height=64),
        Ctx(tmp_path))
    flat = Image.open(out / "00000-0-猫 ü.png")
    assert flat.mode == "RGB" and np.asarray(flat)[2, 2].tolist() == [255, 255, 255]


def test_stop_between_files(tmp_path, src):
    ctx = Ctx(tmp_path, stop_after=1)
    summary = run(PreprocessConfig(source=str(src), destination=str(tmp_path / "out"),
                                   width=64, height=64), ctx)
    assert summary.stopped and summary.processed == 1
    assert outputs(tmp_path / "out") == ["00000-0-a-square.png"]
    assert "Stopped" in ctx.of(ev.Finished)[0].message


class FakeCaptioner:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def caption(self, image):
        self.calls.append((self.name, image.size))
        return f"{self.name} caption" if self.name != "wd14" else ""


def test_captioners_are_loaded_once_combined_and_prepended(tmp_path, src, monkeypatch):
    calls, created = [], []

    def create(name, cfg, paths, device=None):
        created.append(name)
        return FakeCaptioner(name, calls)

    monkeypatch.setattr(captioners, "create", create)
    cfg = PreprocessConfig(source=str(src), destination=str(tmp_path / "out"), width=64,
                           height=64, flip=True, existing_caption="prepend",
                           captioners=["deepbooru", "blip", "wd14"])
    summary = run(cfg, Ctx(tmp_path))
    assert created == ["deepbooru", "blip", "wd14"]
    assert len(calls) == 3 * len(summary.written)  # every output, flips included
    out = tmp_path / "out"
    assert (out / "00000-1-a-square.txt").read_text() == "deepbooru caption, blip caption"
    assert (out / "00001-0-b-wide.txt").read_text() == \
        "a wide photo, cup on the left deepbooru caption, blip caption"
    assert summary.captions == 6


def test_real_tiny_taggers_in_a_run(tmp_path, src):
    from preprocess.testing import build_tiny_deepbooru, build_tiny_wd14
    build_tiny_deepbooru(tmp_path / "models/deepbooru/model-resnet_custom_v3.pt",
                         ["solo", "rating:safe", "cup"], positive=["solo", "rating:safe"],
                         negative=["cup"])
    build_tiny_wd14(tmp_path / "models/wd14/tiny", [("general", "9", (0, 0, 0), 2.0),
                                                    ("simple_background", "0", (0, 0, 0), 1.0)])
    captioners.unload_all()
    try:
        summary = run(PreprocessConfig(source="raw", destination="out", width=64, height=64,
                                       captioners=["deepbooru", "wd14"], wd14_model="tiny"),
                      Ctx(tmp_path))
    finally:
        captioners.unload_all()
    texts = {(tmp_path / "out" / Path(p).name).with_suffix(".txt").read_text()
             for p in summary.written}
    assert texts == {"solo, simple background"}


def test_a_missing_model_fails_before_writing_anything(tmp_path, src):
    with pytest.raises(captioners.CaptionerError, match="wd14_model"):
        run(PreprocessConfig(source=str(src), destination=str(tmp_path / "out"),
                             captioners=["wd14"]), Ctx(tmp_path))
    assert not (tmp_path / "out").exists()


# --- CLI ----------------------------------------------------------------------------------------

def cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "preprocess", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_print_config_round_trips(tmp_path):
    done = cli("--print-config", "--set", "width=256", "--set", "flip=true",
               "--set", "captioners=['wd14', 'blip']", "--set", "source=ü/raw", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = tomllib.loads(done.stdout)
    cfg = from_dict(PreprocessConfig, data)
    assert (cfg.width, cfg.flip, cfg.captioners, cfg.source) == (256, True, ["wd14", "blip"],
                                                                 "ü/raw")
    assert cfg == PreprocessConfig(width=256, flip=True, captioners=["wd14", "blip"],
                                   source="ü/raw")
    (tmp_path / "again.toml").write_text(done.stdout, encoding="utf-8")
    assert load_toml(PreprocessConfig, tmp_path / "again.toml") == cfg
    assert tomllib.loads(to_toml(cfg)) == data


def test_cli_runs_a_config_file(tmp_path, src):
    (tmp_path / "prep.toml").write_text('source = "raw"\ndestination = "out"\nwidth = 64\n'
                                        'height = 64\n', encoding="utf-8")
    done = cli("--config", "prep.toml", "--set", "flip=true", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(outputs(tmp_path / "out")) == 6
    assert "3 of 3" in done.stdout


def test_cli_reports_bad_settings(tmp_path, src):
    done = cli("--set", "source=raw", "--set", "destination=raw", "--set", "width=100",
               cwd=tmp_path)
    assert done.returncode == 2
    assert "destination:" in done.stderr and "width:" in done.stderr


def test_importing_the_engine_loads_no_model_library(tmp_path):
    code = ("import sys, preprocess, preprocess.config, preprocess.captions_edit, "
            "preprocess.captioners; "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'cv2') "
            "if m in sys.modules]; print(heavy); assert not heavy")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_opencv_face_detector_is_checked_up_front(tmp_path, src, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cv2" else real(name, *a))
    cfg = PreprocessConfig(source=str(src), destination=str(tmp_path / "out"), focal_crop=True,
                           face_detector="opencv")
    with pytest.raises(ConfigError, match="face_detector:"):
        cfg.validate()
    cfg.face_detector = "auto"
    cfg.validate()
