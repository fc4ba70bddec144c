"""The Checkpoints tab for APT and XTI runs: "Use this checkpoint" copies an APT pair together,
and Compare renders APT pairs (positive in the prompt, '-neg' in the negative prompt) and XTI
per-layer embeddings."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import ConfigError
from core.paths import Paths
from tests.conftest import RecordingContext, photo
from trainers import checkpoint_use as cu
from trainers import runs as rn
from trainers.formats.embedding import EmbeddingFile, load_embedding, save_embedding


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A data folder with an APT run (copies at steps 1 and 2, final at 3) and an XTI run
    (copy at step 1, final at 2)."""
    from trainers.configs import AptConfig, XtiConfig
    from trainers.registry import runner

    root = tmp_path_factory.mktemp("apt-xti")
    paths = Paths(root / "data").ensure()
    shutil.copytree(tiny_model_dir, paths.cache / "tiny-demo")
    images = root / "images"
    images.mkdir()
    for i in range(2):
        photo(i).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a cat")
    start = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 0.02
    save_embedding(paths.embeddings / "zxq.pt", EmbeddingFile(name="zxq", vectors=start, step=0))
    common = dict(model="tiny-demo", data_root=str(images), width=32, height=32, save_every=1,
                  preview_every=0, learn_rate="0.5", seed=1, template="subject_filewords.txt")
    runner("apt")(AptConfig(embedding="zxq", steps=3, **common).validate(),
                  RecordingContext(paths))
    runner("xti")(XtiConfig(output_name="xtok", steps=2, init_text="cat",
                            num_vectors_per_token=2, **common).validate(),
                  RecordingContext(paths))
    return paths


def by_method(paths):
    return {run.method: run for run in rn.scan_runs(paths)}


def vectors(path):
    return load_embedding(path).vectors


def test_apt_checkpoints_know_their_negative_partner(trained):
    apt = by_method(trained)["apt"]
    assert [(c.step, c.final) for c in apt.checkpoints] == [(1, False), (2, False), (3, True)]
    first, _, final = apt.checkpoints
    assert first.partners == (first.path.with_name("zxq-neg-1.pt"),)
    assert final.path == trained.embeddings / "zxq.pt"
    assert final.partners == (trained.embeddings / "zxq-neg.pt",)
    assert all(p.is_file() for c in apt.checkpoints for p in c.partners)


def test_use_copies_the_apt_pair_under_the_new_name(trained):
    apt = by_method(trained)["apt"]
    first, _, final = apt.checkpoints
    made = cu.use_checkpoint_files(trained, apt, first, "picked")
    assert made == [trained.embeddings / "picked.pt", trained.embeddings / "picked-neg.pt"]
    positive, negative = (load_embedding(p) for p in made)
    assert torch.equal(positive.vectors, vectors(first.path))
    assert torch.equal(negative.vectors, vectors(first.partners[0]))
    assert not torch.equal(positive.vectors, negative.vectors)
    # the stored names follow the file names, as A1111 writes them
    assert (positive.name, negative.name) == ("picked", "picked-neg")
    assert (positive.step, negative.step) == (1, 1)
    assert not (trained.embeddings / "picked.pt.optim").exists()  # a copy has no optimizer state

    # the final pair brings the optimizer state along, so training can continue from it
    made = cu.use_checkpoint_files(trained, apt, final, "finalpair")
    assert made[0].with_name("finalpair.pt.optim").read_bytes() == \
        (trained.embeddings / "zxq.pt.optim").read_bytes()
    assert torch.equal(vectors(made[1]), vectors(trained.embeddings / "zxq-neg.pt"))
    for path in made + [made[0].with_name("finalpair.pt.optim")]:
        path.unlink()


@pytest.mark.parametrize("existing", ["both-neg.pt", "both.pt", "both-neg.safetensors"])
def test_use_refuses_the_pair_when_either_name_is_taken(trained, existing):
    apt = by_method(trained)["apt"]
    first = apt.checkpoints[0]
    taken = trained.embeddings / existing
    taken.write_bytes(b"old")
    try:
        before = sorted(p.name for p in trained.embeddings.iterdir())
        with pytest.raises(cu.CheckpointExists, match=f"name: {existing} already exists.*Overwrite"):
            cu.use_checkpoint_files(trained, apt, first, "both")
        assert sorted(p.name for p in trained.embeddings.iterdir()) == before  # neither written
        assert taken.read_bytes() == b"old"

        made = cu.use_checkpoint_files(trained, apt, first, "both", overwrite=True)  # confirmed
        assert [p.name for p in made] == ["both.pt", "both-neg.pt"]
        assert torch.equal(vectors(made[1]), vectors(first.partners[0]))
        assert not (trained.embeddings / "both-neg.safetensors").exists()  # no name clash left
    finally:
        for name in ("both.pt", "both-neg.pt", "both-neg.safetensors"):
            (trained.embeddings / name).unlink(missing_ok=True)


def test_use_writes_neither_file_when_the_second_fails(trained, monkeypatch):
    apt = by_method(trained)["apt"]
    first, second, _ = apt.checkpoints
    real_link, real_replace = os.link, os.replace

    def failing(real, error):
        def call(source, target, *args, **kwargs):
            if str(target).endswith("-neg.pt") and str(source).endswith(".tmp"):
                raise error
            return real(source, target, *args, **kwargs)
        return call

    # the '-neg' name appears (another program) between the check and the copy
    monkeypatch.setattr(cu.os, "link", failing(real_link, FileExistsError("taken")))
    with pytest.raises(cu.CheckpointExists, match="half-neg.pt appeared.*nothing was replaced"):
        cu.use_checkpoint_files(trained, apt, first, "half")
    assert not list(trained.embeddings.glob("half*")) and not list(trained.embeddings.glob(".half*"))
    monkeypatch.undo()

    made = cu.use_checkpoint_files(trained, apt, first, "half")
    old = [p.read_bytes() for p in made]
    monkeypatch.setattr(cu.os, "replace", failing(real_replace, OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):  # overwriting: the first comes back
        cu.use_checkpoint_files(trained, apt, second, "half", overwrite=True)
    monkeypatch.undo()
    assert [p.read_bytes() for p in made] == old
    assert sorted(p.name for p in trained.embeddings.glob("*half*")) == ["half-neg.pt", "half.pt"]
    for path in made:
        path.unlink()


def test_use_refuses_a_pair_with_a_missing_partner_or_a_neg_name(trained):
    apt = by_method(trained)["apt"]
    first = apt.checkpoints[0]
    with pytest.raises(ConfigError, match="name: APT / DreamArtist checkpoints are pairs"):
        cu.use_checkpoint_files(trained, apt, first, "other-neg")
    partner = first.partners[0]
    saved = partner.read_bytes()
    partner.unlink()
    try:
        with pytest.raises(FileNotFoundError, match="zxq-neg-1.pt is gone.*nothing was copied"):
            cu.use_checkpoint_files(trained, apt, first, "lonely")
        assert not list(trained.embeddings.glob("lonely*"))
    finally:
        partner.write_bytes(saved)


def cells(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_compare_renders_apt_pairs_with_the_negative_in_the_negative_prompt(trained, tmp_path):
    from trainers.compare import CompareSpec, render_grid, spec_for_run
    apt = by_method(trained)["apt"]
    spec = spec_for_run(apt, ["1", "3-final"], "1", "a photo of zxq", "3", steps=2)
    assert spec.columns() == [("a photo of zxq", "a photo of zxq-neg", 3)]
    assert spec_for_run(apt, ["1"], "1", "zxq --n blurry", "3").columns()[0][1] == "zxq-neg, blurry"
    assert spec_for_run(apt, ["1"], "1", "zxq --n zxq-neg", "3").columns()[0][1] == "zxq-neg"
    result = render_grid(spec, trained, cache_dir=tmp_path / "grid")
    assert result.row_labels == ["step 1", "step 3 (final)"] and result.rendered == 2
    rendered = cells(tmp_path / "grid")
    assert len({c.tobytes() for c in rendered.values()}) == 2  # the checkpoints differ

    # the '-neg' embedding is used: another negative alone changes the image (and the cache key)
    other = tmp_path / "other-neg.pt"
    save_embedding(other, EmbeddingFile(name="zxq-neg", vectors=torch.randn(2, 32), step=1))
    swapped = CompareSpec(**{**spec.__dict__, "checkpoints": spec.checkpoints[:1],
                             "partners": [[str(other)]]}).validate()
    render_grid(swapped, trained, cache_dir=tmp_path / "grid")
    after = cells(tmp_path / "grid")
    assert len(after) == 3 and len({c.tobytes() for c in after.values()}) == 3

    with pytest.raises(ConfigError, match="needs its '-neg' embedding"):
        CompareSpec(**{**spec.__dict__, "partners": []}).validate()


def test_compare_renders_xti_checkpoints_per_layer(trained, tmp_path):
    from trainers.compare import render_grid, spec_for_run
    from trainers.models import load_model
    xti = by_method(trained)["xti"]
    assert [(c.step, c.final) for c in xti.checkpoints] == [(1, False), (2, True)]
    spec = spec_for_run(xti, ["1", "2-final"], "1", "a photo of xtok", "3, 4", steps=2)
    result = render_grid(spec, trained, cache_dir=tmp_path / "grid")
    assert result.rendered == 4
    rendered = list(cells(tmp_path / "grid").values())
    assert len({c.tobytes() for c in rendered}) == 4
    unet = load_model(trained, "tiny-demo").unet
    assert not any(m._forward_pre_hooks for m in unet.modules())  # the per-layer hooks are gone
