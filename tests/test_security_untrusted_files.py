"""Untrusted files: a pickle that would run code, planted where the app reads files (embedding,
hypernetwork, optimizer sidecar, .ckpt model), is refused with a message naming the file, and
its code never runs."""
from __future__ import annotations

import pickle

import pytest
import torch

from core.jobs import DONE, FAILED, JobRunner
from tests.test_hypernetwork_training import hn_config
from tests.test_textual_inversion import make_embedding, ti_config


class RunsCode:
    """Unpickling this would call open(marker, "w"): proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker, writer: str) -> None:
    payload = {"string_to_param": {"*": RunsCode(marker)}, "step": 5,
               "state_dict": {"w": RunsCode(marker)}, 768: (RunsCode(marker), {})}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch.save")


def run_job(paths, fn):
    runner = JobRunner(paths)
    job = runner.submit("job", "train", fn)
    assert runner.wait(job, 120)
    return job


WRITERS = ["torch.save", "torch.save-legacy", "pickle"]
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def test_embedding(data_paths, photo_dataset, tmp_path):
    from trainers.methods.textual_inversion import run
    marker = tmp_path / "PWNED"
    plant(data_paths.embeddings / "evil.pt", marker, "torch.save")
    job = run_job(data_paths, lambda ctx: run(ti_config(photo_dataset, embedding="evil"), ctx))
    assert job.state == FAILED
    assert "evil.pt: refused to load: it contains Python objects" in job.result.message
    assert not marker.exists()


def test_hypernetwork(data_paths, photo_dataset, tmp_path):
    from trainers.methods.hypernetwork import run
    marker = tmp_path / "PWNED"
    plant(data_paths.hypernetworks / "evilnet.pt", marker, "torch.save")
    job = run_job(data_paths,
                  lambda ctx: run(hn_config(photo_dataset, hypernetwork="evilnet"), ctx))
    assert job.state == FAILED
    assert "evilnet.pt: refused to load" in job.result.message
    assert not marker.exists()


def test_optimizer_sidecar(data_paths, photo_dataset, tmp_path):
    """A planted .optim is not loaded: training continues with a fresh optimizer and says why."""
    from trainers.methods.textual_inversion import run
    marker = tmp_path / "PWNED"
    path = make_embedding(data_paths)
    assert run_job(data_paths, lambda ctx: run(ti_config(photo_dataset, steps=1), ctx)).state == DONE
    plant(path.with_name(path.name + ".optim"), marker, "torch.save")
    job = run_job(data_paths, lambda ctx: run(ti_config(photo_dataset, steps=2), ctx))
    assert job.state == DONE
    said = " ".join(job.snapshot()["log"])
    assert "Continuing at step 1 with a fresh optimizer (zxqtok.pt.optim is unreadable" in said
    assert "zxqtok.pt.optim: refused to load" in said
    assert not marker.exists()


def test_ckpt_model(data_paths, photo_dataset, tmp_path):
    from trainers.methods.textual_inversion import run
    marker = tmp_path / "PWNED"
    plant(data_paths.stable_diffusion / "evil.ckpt", marker, "torch.save")
    make_embedding(data_paths)
    job = run_job(data_paths, lambda ctx: run(ti_config(photo_dataset, model="evil.ckpt"), ctx))
    assert job.state == FAILED
    assert "evil.ckpt" in job.result.message and "refused to load" in job.result.message
    assert not marker.exists()


@pytest.mark.parametrize("writer", WRITERS)
def test_every_loader_that_reads_pickles_refuses_them(tmp_path, writer):
    """The loaders themselves, for each way of writing a pickle (the jobs above use one)."""
    from core.paths import Paths
    from trainers.formats.embedding import load_embedding
    from trainers.formats.hypernetwork import load_hypernetwork
    from trainers.formats.lora import load_lora
    from trainers.formats.optim_sidecar import load_optim
    from trainers.formats.safe_load import UnsafeFileError
    from trainers.models import ModelError, load_model
    marker = tmp_path / "PWNED"
    paths = Paths(tmp_path / "data").ensure()
    plant(paths.stable_diffusion / "f.ckpt", marker, writer)
    with pytest.raises(ModelError, match="f.ckpt"):
        load_model(paths, "f.ckpt")
    for name in ["a.pt", "b.bin", "c.pt", "d.pt"]:
        plant(tmp_path / name, marker, writer)
    with pytest.raises(UnsafeFileError, match="a.pt"):
        load_embedding(tmp_path / "a.pt")
    with pytest.raises(UnsafeFileError, match="b.bin"):
        load_embedding(tmp_path / "b.bin")
    with pytest.raises(UnsafeFileError, match="c.pt"):
        load_hypernetwork(tmp_path / "c.pt")
    plant(tmp_path / "e.pt.optim", marker, writer)
    payload, reason = load_optim(tmp_path / "e.pt", "anything")
    assert payload is None and "e.pt.optim: refused to load" in reason
    with pytest.raises(UnsafeFileError, match="d.pt"):
        load_lora(tmp_path / "d.pt")
    assert not marker.exists()
