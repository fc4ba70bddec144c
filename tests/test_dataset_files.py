"""One list of image types for the whole project: the preflight counts what every loader loads,
LoRA reads GIFs, and every file a run does not use is named in what the run reports."""
from __future__ import annotations

import json

import pytest

from core.events import Status
from core.images import IMAGE_EXTENSIONS, describe_skipped, list_images, scan_folder
from preprocess import captions_edit
from preprocess.config import PreprocessConfig
from preprocess.pipeline import run as preprocess
from tests.conftest import RecordingContext, photo
from tests.image_kinds import KINDS, write_all
from tests.test_lora_training import lora_config
from trainers import finetune_metadata, kohya_data
from trainers.data import DatasetError, load_dataset
from trainers.formats.lora import load_lora
from trainers.methods.lora import run as train_lora
from trainers.preflight import check_before_queueing, check_dataset, count_images

STRAYS = {"notes.txt": "a caption file with no image", "drawing.psd": "not an image type",
          "README": "not an image type"}


@pytest.fixture(scope="module")
def vae():
    from trainers.tiny_model import build_components
    _, vae, _ = build_components(0)
    return vae.eval()


def mixed_folder(folder):
    """Every awkward kind, every listed extension, captions beside some, and stray files."""
    write_all(folder)
    for number, extension in enumerate(IMAGE_EXTENSIONS):
        if extension not in (".gif",):  # a GIF is among the kinds already
            photo(number, 64).save(folder / f"photo{number}{extension}",
                                   format={".jfif": "JPEG", ".tif": "TIFF"}.get(extension))
    (folder / "photo0.txt").write_text("a caption beside its image")
    (folder / "photo0.npz").write_bytes(b"a latent cache beside its image")
    (folder / "notes.txt").write_text("a stray note")
    (folder / "drawing.psd").write_bytes(b"8BPS fake photoshop")
    (folder / "README").write_text("no extension")
    (folder / ".hidden.png").write_bytes(b"hidden files are not looked at")
    return folder


def test_the_preflight_counts_what_every_loader_loads(tmp_path, vae):
    folder = mixed_folder(tmp_path / "mixed")
    expected = len(KINDS) + len(IMAGE_EXTENSIONS) - 1
    assert count_images(folder) == expected
    assert check_dataset_ok(tmp_path, folder)

    ti = load_dataset(folder, vae, 64, 64, varsize=False, batch_size=1, seed=0,
                      latent_sampling="deterministic", use_weight=False)
    kohya = kohya_data.scan_dataset(kohya_data.folder_dataset(folder, resolution=64))
    summary = preprocess(PreprocessConfig(source=str(folder), destination=str(tmp_path / "out"),
                                          width=64, height=64))
    loaded = {
        "textual inversion": len(ti.examples),
        "kohya (LoRA, DreamBooth)": len(kohya.train_images),
        "preprocess": summary.processed,
        "dataset editor": len(captions_edit.list_images(folder)),
        "fine-tune metadata": len(finetune_metadata.list_images(folder)),
        "aesthetic": len(scan_folder(folder).images),
    }
    assert loaded == {loader: expected for loader in loaded}

    assert dict(ti.skipped).keys() == STRAYS.keys()
    for name, why in STRAYS.items():
        assert why in dict(ti.skipped)[name]
    note = next(n for n in kohya.notes if n.startswith("mixed: Skipped 3 files"))
    assert all(name in note for name in STRAYS)
    assert "photo0.txt" not in note and "photo0.npz" not in note and ".hidden" not in note
    assert {"drawing.psd", "README"} <= {name for name, _ in summary.skipped}


def check_dataset_ok(tmp_path, folder) -> bool:
    from core.paths import Paths
    return check_dataset(Paths(tmp_path / "data").ensure(), str(folder)) == []


def test_a_folder_of_only_strays_is_refused_by_the_preflight_naming_the_types(tmp_path):
    from core.paths import Paths
    folder = tmp_path / "strays"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    (folder / "drawing.psd").write_bytes(b"8BPS")
    problems = check_dataset(Paths(tmp_path / "data").ensure(), str(folder))
    assert problems == [f"data_root: {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})"]


def test_a_gif_only_folder_trains_lora(data_paths, tmp_path):
    sub = tmp_path / "train" / "2_zxq cat"
    sub.mkdir(parents=True)
    for i in range(3):
        photo(i, 64).save(sub / f"img{i}.gif")
        (sub / f"img{i}.txt").write_text(f"zxq cat, photo {i}")
    cfg = lora_config(tmp_path / "train", max_train_steps=2)
    check_before_queueing(cfg, data_paths)
    ctx = RecordingContext(data_paths)
    path = train_lora(cfg, ctx)
    _, meta = load_lora(path)
    assert meta["ss_steps"] == "2"
    assert json.loads(meta["ss_dataset_dirs"])["2_zxq cat"] == {"n_repeats": 2, "img_count": 3}
    assert not [s.text for s in ctx.of(Status) if "Skipped" in s.text]


def test_a_lora_run_names_every_file_it_skipped(data_paths, tmp_path):
    sub = tmp_path / "train" / "2_zxq cat"
    sub.mkdir(parents=True)
    for i in range(2):
        photo(i, 64).save(sub / f"img{i}.png")
        (sub / f"img{i}.txt").write_text("zxq cat")
    (sub / "notes.txt").write_text("a stray note")
    (sub / "broken.png").write_bytes(b"not a png at all")
    (sub / "drawing.psd").write_bytes(b"8BPS")
    photo(3, 64).save(tmp_path / "train" / "loose.png")  # beside the repeats folder: unused
    ctx = RecordingContext(data_paths)
    train_lora(lora_config(tmp_path / "train", max_train_steps=1), ctx)
    said = "\n".join(s.text for s in ctx.of(Status))
    for name in ("notes.txt", "broken.png", "drawing.psd", "loose.png"):
        assert name in said, f"{name} is not named in the run's status:\n{said}"
    assert "img0.txt" not in said


def test_a_truncated_image_fails_the_kohya_cache_naming_the_file(tmp_path, vae):
    sub = tmp_path / "train" / "1_x"
    sub.mkdir(parents=True)
    photo(0, 64).save(sub / "good.png")
    photo(1, 64).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (sub / "cut.jpg").write_bytes(data[:len(data) // 2])  # the header reads, the pixels do not
    config = kohya_data.folder_dataset(tmp_path / "train", resolution=64)
    assert len(kohya_data.scan_dataset(config).train_images) == 2
    with pytest.raises(DatasetError, match=r"cut\.jpg: unreadable image .*remove or replace"):
        kohya_data.prepare_datasets(config, vae)


def test_many_skipped_files_are_named_up_to_a_limit():
    skipped = [(f"file{i:02}.psd", "not an image type") for i in range(15)]
    text = describe_skipped(skipped)
    assert text.startswith("Skipped 15 files: file00.psd (not an image type); file01.psd")
    assert "file09.psd" in text and "file10.psd" not in text and text.endswith("... and 5 more")
    assert describe_skipped(skipped[:1]) == "Skipped 1 file: file00.psd (not an image type)"


def test_list_images_is_case_insensitive_and_skips_hidden_and_folders(tmp_path):
    photo(0, 16).save(tmp_path / "UPPER.PNG")
    photo(0, 16).save(tmp_path / "b.JpEg", format="JPEG")
    photo(0, 16).save(tmp_path / ".hidden.png")
    (tmp_path / "folder.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["UPPER.PNG", "b.JpEg"]


def test_fine_tune_finds_a_gif_and_names_images_its_metadata_leaves_out(tmp_path):
    from tests.test_fine_tune import ft_config, write_json
    from trainers.finetune_data import scan_metadata
    from trainers.methods import fine_tune
    folder = tmp_path / "images"
    folder.mkdir()
    photo(0, 64).save(folder / "listed.gif")
    photo(1, 64).save(folder / "unlisted.png")
    meta = {"listed": {"caption": "a gif"}}
    cfg = ft_config(folder, write_json(tmp_path / "m.json", meta))
    dataset = scan_metadata(fine_tune.dataset_config(cfg, folder), meta)
    assert [e.path.name for e in dataset.entries] == ["listed.gif"]
    assert "images: Skipped 1 file: unlisted.png (not in the metadata JSON)" in dataset.notes
