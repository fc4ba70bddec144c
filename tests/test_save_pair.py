"""A trained file and its .optim sidecar are saved as a pair: both reach their final names or
neither does (core.atomic.together), an interrupted set of moves is finished or dropped at the
next start (recover), and a save whose weights do not fit the save precision is refused."""
from __future__ import annotations

import errno
import os

import pytest
import torch

import core.atomic
import trainers.loop
from core import events as ev
from core.atomic import atomic_write_text, recover, staged_path, together
from tests.conftest import RecordingContext
from tests.test_textual_inversion import make_embedding, ti_config
from trainers.formats.embedding import EmbeddingFile, load_embedding, save_embedding
from trainers.formats.lora import save_lora
from trainers.formats.optim_sidecar import optim_path, pair_journal, save_optim
from trainers.formats.safe_load import safe_torch_load
from trainers.formats.save_check import SaveRefusedError, check_savable
from trainers.methods.textual_inversion import run


# ---------------------------------------------------------------- together() and recover()

def test_files_written_together_appear_only_when_the_block_ends(tmp_path):
    first, second = tmp_path / "model.pt", tmp_path / "model.pt.optim"
    first.write_text("old model")
    second.write_text("old optim")
    with together(tmp_path / ".model.pt.pair"):
        atomic_write_text(first, "new model")
        assert first.read_text() == "old model"  # not yet
        assert staged_path(first).read_text() == "new model"
        atomic_write_text(second, "new optim")
    assert (first.read_text(), second.read_text()) == ("new model", "new optim")
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "model.pt.optim"]
    assert staged_path(first) == first  # outside a block: the file itself


def test_a_failure_inside_the_block_leaves_both_previous_files(tmp_path):
    first, second = tmp_path / "model.pt", tmp_path / "model.pt.optim"
    first.write_text("old model")
    second.write_text("old optim")
    with pytest.raises(OSError, match="No space left"):
        with together(tmp_path / ".model.pt.pair"):
            atomic_write_text(first, "new model")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (first.read_text(), second.read_text()) == ("old model", "old optim")
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "model.pt.optim"]


def test_blocks_do_not_nest(tmp_path):
    with together(tmp_path / ".a.pair"):
        with pytest.raises(RuntimeError, match="do not nest"):
            with together(tmp_path / ".b.pair"):
                pass


def _interrupt_moves_after(monkeypatch, moves: int):
    """os.replace in core.atomic raises KeyboardInterrupt after `moves` moves of the block
    (the journal's own move is the first)."""
    real, done = os.replace, []

    def replace(src, dst):
        if len(done) == moves:
            raise KeyboardInterrupt
        done.append(dst)
        real(src, dst)
    monkeypatch.setattr(core.atomic.os, "replace", replace)


def test_recover_finishes_the_moves_once_the_first_file_moved(tmp_path, monkeypatch):
    first, second = tmp_path / "model.pt", tmp_path / "model.pt.optim"
    first.write_text("old model")
    second.write_text("old optim")
    journal = tmp_path / ".model.pt.pair"
    _interrupt_moves_after(monkeypatch, 2)  # the journal, then the model: not the sidecar
    with pytest.raises(KeyboardInterrupt):
        with together(journal):
            atomic_write_text(first, "new model")
            atomic_write_text(second, "new optim")
    monkeypatch.undo()
    assert (first.read_text(), second.read_text()) == ("new model", "old optim")
    assert journal.exists()
    assert "finished an interrupted save" in recover(journal, [first, second])
    assert (first.read_text(), second.read_text()) == ("new model", "new optim")
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "model.pt.optim"]
    assert recover(journal, [first, second]) is None  # nothing left to do


def test_recover_drops_the_new_files_when_nothing_had_moved(tmp_path, monkeypatch):
    first, second = tmp_path / "model.pt", tmp_path / "model.pt.optim"
    first.write_text("old model")
    second.write_text("old optim")
    journal = tmp_path / ".model.pt.pair"
    _interrupt_moves_after(monkeypatch, 1)  # the journal only
    with pytest.raises(KeyboardInterrupt):
        with together(journal):
            atomic_write_text(first, "new model")
            atomic_write_text(second, "new optim")
    monkeypatch.undo()
    assert "dropped" in recover(journal, [first, second])
    assert (first.read_text(), second.read_text()) == ("old model", "old optim")
    assert sorted(os.listdir(tmp_path)) == ["model.pt", "model.pt.optim"]


def test_recover_removes_temporary_files_of_a_write_that_never_finished(tmp_path):
    final = tmp_path / "model.pt"
    final.write_text("model")
    (tmp_path / ".model.pt.x1y2.tmp").write_text("half a mod")
    (tmp_path / ".model.pt.optim.z3.tmp").write_text("half")
    (tmp_path / ".other.pt.q.tmp").write_text("another file's write")
    assert "removed" in recover(pair_journal(final), [final, optim_path(final)])
    assert sorted(os.listdir(tmp_path)) == [".other.pt.q.tmp", "model.pt"]


def test_a_garbled_journal_is_dropped(tmp_path):
    journal = tmp_path / ".model.pt.pair"
    journal.write_text("{not json")
    assert "dropped" in recover(journal)
    assert not journal.exists()


# ---------------------------------------------------------------- the loop saves pairs

def test_a_failure_between_the_file_and_its_sidecar_keeps_the_previous_pair(
        data_paths, photo_dataset, monkeypatch):
    path = make_embedding(data_paths)
    run(ti_config(photo_dataset, steps=2), RecordingContext(data_paths))
    old_file, old_optim = path.read_bytes(), optim_path(path).read_bytes()

    def disk_full(*args, **kwargs):  # the embedding was written; then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(trainers.loop, "save_optim", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(ti_config(photo_dataset, steps=4), RecordingContext(data_paths))
    monkeypatch.undo()
    assert path.read_bytes() == old_file and optim_path(path).read_bytes() == old_optim
    assert sorted(os.listdir(path.parent)) == ["zxqtok.pt", "zxqtok.pt.optim"]

    ctx = RecordingContext(data_paths)  # the pair still resumes with its optimizer state
    run(ti_config(photo_dataset, steps=3), ctx)
    assert any("Resuming at step 2 with the saved optimizer state" in e.text
               for e in ctx.of(ev.Status))


def test_a_save_interrupted_between_the_moves_is_finished_at_the_next_start(
        data_paths, photo_dataset, monkeypatch):
    path = make_embedding(data_paths)
    run(ti_config(photo_dataset, steps=2), RecordingContext(data_paths))
    # the final save of step 3: the journal and the embedding move, then the process stops
    real, moves = os.replace, []

    def replace(src, dst):
        moves.append(dst)
        if str(dst).endswith(".optim") and load_embedding(path).step == 3:
            raise KeyboardInterrupt
        real(src, dst)
    monkeypatch.setattr(core.atomic.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        run(ti_config(photo_dataset, steps=3), RecordingContext(data_paths))
    monkeypatch.undo()
    assert load_embedding(path).step == 3
    assert safe_torch_load(optim_path(path))["danlu"]["step"] == 2  # until recovered
    assert pair_journal(path).exists()

    ctx = RecordingContext(data_paths)
    run(ti_config(photo_dataset, steps=4), ctx)
    texts = [e.text for e in ctx.of(ev.Status)]
    assert any("finished an interrupted save" in t for t in texts)
    assert any("Resuming at step 3 with the saved optimizer state" in t for t in texts)
    assert sorted(os.listdir(path.parent)) == ["zxqtok.pt", "zxqtok.pt.optim"]


def test_a_sidecar_of_another_step_is_not_resumed(data_paths, photo_dataset):
    path = make_embedding(data_paths)
    run(ti_config(photo_dataset, steps=2), RecordingContext(data_paths))
    payload = safe_torch_load(optim_path(path))
    payload["danlu"]["step"] = 5  # same hash, another step: not this file's optimizer state
    save_optim(path, payload["hash"], payload["optimizer_name"],
               payload["optimizer_state_dict"], extra=payload["danlu"])
    ctx = RecordingContext(data_paths)
    run(ti_config(photo_dataset, steps=3), ctx)
    assert any("Continuing at step 2 with a fresh optimizer (zxqtok.pt.optim is of step 5, "
               "the file of step 2)" in e.text for e in ctx.of(ev.Status))


# ---------------------------------------------------------------- refused saves

def test_weights_that_fit_their_precision_are_accepted():
    check_savable("a.safetensors", {"w": torch.tensor([65504.0, -1.0]), "ids": torch.arange(3)},
                  torch.float16)
    check_savable("a.safetensors", {"w": torch.tensor([1e30])})  # fp32 holds it


def test_a_save_that_would_overflow_names_the_precision_and_the_largest_value():
    with pytest.raises(SaveRefusedError) as caught:
        check_savable("a.safetensors", {"w": torch.tensor([1e6, 2.0, -3e6])}, torch.float16)
    assert str(caught.value) == ("a.safetensors: not saved, 2 values overflow fp16 (largest "
                                 "3e+06; fp16 holds up to 65504); the previous file is kept")
    with pytest.raises(SaveRefusedError, match=r"1 values are nan/inf \(first in b\)"):
        check_savable("a.safetensors", {"a": torch.ones(2), "b": torch.tensor([float("nan")])})


def test_a_refused_lora_save_leaves_the_previous_file(tmp_path):
    path = tmp_path / "x.safetensors"
    state = {"lora_unet_a.lora_down.weight": torch.ones(2, 4),
             "lora_unet_a.lora_up.weight": torch.ones(4, 2), "lora_unet_a.alpha": torch.tensor(2.0)}
    save_lora(path, state, precision="fp16")
    before = path.read_bytes()
    state["lora_unet_a.lora_up.weight"] = torch.full((4, 2), 1e6)
    with pytest.raises(SaveRefusedError, match="8 values overflow fp16 .largest 1e.06"):
        save_lora(path, state, precision="fp16")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.safetensors"]
    save_lora(path, state, precision="fp32")  # fp32 holds 1e6


def test_a_refused_embedding_save_leaves_the_previous_file(tmp_path):
    path = tmp_path / "e.pt"
    save_embedding(path, EmbeddingFile(name="e", vectors=torch.ones(2, 8), step=1))
    before = path.read_bytes()
    with pytest.raises(SaveRefusedError, match="e.pt: not saved, 1 values are nan/inf"):
        save_embedding(path, EmbeddingFile(name="e", vectors=torch.tensor(
            [[1.0] * 7 + [float("inf")]] * 1), step=2))
    assert path.read_bytes() == before


# ---------------------------------------------------------------- the run's log

def test_a_loss_line_cut_by_a_kill_is_dropped_before_the_next_rows(tmp_path):
    import csv

    from trainers.run_folder import RunFolder
    run_folder = RunFolder.create(tmp_path, "x", "loss.csv")
    run_folder.log_loss(1, 0, 1, 0.5, 1e-3)
    run_folder.flush()
    path = run_folder.root / "loss.csv"
    with open(path, "a") as handle:
        handle.write("2,0,2,0.4")  # the kill came mid-line
    again = RunFolder.create(tmp_path, "x", "loss.csv")  # the resumed run
    again.log_loss(2, 0, 2, 0.25, 1e-3)
    again.flush()
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows == [["step", "epoch", "epoch_step", "loss", "learn_rate"],
                    ["1", "0", "1", "0.5000000", "0.001"], ["2", "0", "2", "0.2500000", "0.001"]]


def test_a_loss_file_cut_inside_its_header_gets_the_header_again(tmp_path):
    from trainers.run_folder import RunFolder
    run_folder = RunFolder.create(tmp_path, "x", "loss.csv")
    (run_folder.root / "loss.csv").write_text("step,ep")
    run_folder.log_loss(1, 0, 1, 0.5, 1e-3)
    run_folder.flush()
    assert (run_folder.root / "loss.csv").read_text().splitlines()[0].startswith("step,epoch,")
