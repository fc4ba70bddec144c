""""Use this checkpoint" copies only what the restricted loader reads: a pickle that would run
code (here os.system), planted in a run's checkpoint folder for any method, is refused with a
message naming the file and the global it wanted, nothing is written and nothing runs."""
from __future__ import annotations

import os
import pickle
import struct

import pytest
import torch

from core.paths import Paths
from trainers import catalog
from trainers import checkpoint_use as cu
from trainers.runs import Checkpoint, Run, final_folder

# every method whose runs leave checkpoints to pick from
METHODS = sorted(m.name for m in catalog.methods() if m.comparable)
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt")  # what a run's checkpoint list shows besides .safetensors
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


class RunsCommand:
    """Unpickling this calls os.system(command): proof that code from the file ran."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_evil(path, marker, writer="torch.save"):
    payload = {"state_dict": {"w": RunsCommand(f"touch {marker}")}, "step": 3}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch.save")


def write_plain(path):
    torch.save({"w": torch.ones(2, 2), "step": 3}, path, _use_new_zipfile_serialization=False)


def make_run(paths, method, files, final=False, partners=()):
    folder = paths.outputs / method / "2001-01-01" / "run" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint(step=3, path=files, final=final, partners=tuple(partners))
    return Run(id=f"{method}/2001-01-01/run", root=folder.parent, name="run", method=method,
               sessions=[], losses=[], checkpoints=[checkpoint]), checkpoint


def listing(paths, method):
    folder = final_folder(paths, method)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def paths(tmp_path):
    return Paths(tmp_path / "data").ensure()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_a_pickle_that_runs_code_is_refused_for_every_method(paths, tmp_path, method, suffix):
    marker = tmp_path / "PWNED"
    source = paths.outputs / "planted" / f"run-3{suffix}"
    source.parent.mkdir(parents=True)
    write_evil(source, marker)
    run, checkpoint = make_run(paths, method, source)
    before = listing(paths, method)
    with pytest.raises(cu.RefusedCheckpoint) as caught:
        cu.use_checkpoint_files(paths, run, checkpoint, "picked")
    message = str(caught.value)
    assert message.startswith(f"run-3{suffix}: refused to load"), message
    assert "posix.system" in message and "nothing was copied" in message
    assert "weights_only" not in message
    assert listing(paths, method) == before  # no file, no temporary file
    assert not marker.exists()


@pytest.mark.parametrize("method", METHODS)
def test_a_plain_pickle_is_still_copied_for_every_method(paths, method):
    source = paths.outputs / "planted" / "run-3.pt"
    source.parent.mkdir(parents=True)
    write_plain(source)
    run, checkpoint = make_run(paths, method, source)
    made = cu.use_checkpoint(paths, run, checkpoint, "picked")
    assert made == final_folder(paths, method) / "picked.pt"
    assert torch.equal(torch.load(made, weights_only=True)["w"], torch.ones(2, 2))


@pytest.mark.parametrize("writer", ["torch.save", "torch.save-legacy", "pickle"])
def test_every_way_of_writing_the_pickle_is_refused(paths, tmp_path, writer):
    marker = tmp_path / "PWNED"
    source = paths.outputs / "planted" / "run-3.pt"
    source.parent.mkdir(parents=True)
    write_evil(source, marker, writer)
    run, checkpoint = make_run(paths, "lora", source)
    with pytest.raises(cu.RefusedCheckpoint, match="run-3.pt: refused to load.*posix.system"):
        cu.use_checkpoint(paths, run, checkpoint, "picked")
    assert listing(paths, "lora") == [] and not marker.exists()


def test_an_apt_pair_with_a_bad_negative_is_refused_whole(paths, tmp_path):
    marker = tmp_path / "PWNED"
    folder = paths.outputs / "planted"
    folder.mkdir(parents=True)
    write_plain(folder / "run-3.pt")
    write_evil(folder / "run-neg-3.pt", marker)
    run, checkpoint = make_run(paths, "apt", folder / "run-3.pt",
                               partners=[folder / "run-neg-3.pt"])
    with pytest.raises(cu.RefusedCheckpoint, match="run-neg-3.pt: refused to load"):
        cu.use_checkpoint_files(paths, run, checkpoint, "picked")
    assert listing(paths, "apt") == [] and not marker.exists()


def test_a_final_file_whose_sidecar_runs_code_is_refused(paths, tmp_path):
    """The final file brings its .optim along; a planted sidecar stops the whole copy."""
    marker = tmp_path / "PWNED"
    paths.lora.mkdir(parents=True, exist_ok=True)
    final = paths.lora / "run.safetensors"
    import safetensors.torch
    safetensors.torch.save_file({"w": torch.ones(2)}, final)
    write_evil(final.with_name("run.safetensors.optim"), marker)
    (paths.lora / "picked.safetensors").write_bytes(b"old")
    run, checkpoint = make_run(paths, "lora", final, final=True)
    with pytest.raises(cu.RefusedCheckpoint, match="run.safetensors.optim: refused to load"):
        cu.use_checkpoint(paths, run, checkpoint, "picked", overwrite=True)
    assert (paths.lora / "picked.safetensors").read_bytes() == b"old"
    assert listing(paths, "lora") == ["picked.safetensors", "run.safetensors",
                                      "run.safetensors.optim"]
    assert not marker.exists()


def test_a_safetensors_file_with_a_bad_header_is_refused(paths):
    source = paths.outputs / "planted" / "run-3.safetensors"
    source.parent.mkdir(parents=True)
    header = b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}'
    source.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)  # data cut short
    run, checkpoint = make_run(paths, "lora", source)
    with pytest.raises(cu.RefusedCheckpoint,
                       match="run-3.safetensors: not a readable safetensors file"):
        cu.use_checkpoint(paths, run, checkpoint, "picked")
    assert listing(paths, "lora") == []
