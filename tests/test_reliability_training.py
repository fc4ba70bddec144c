"""Never lose work: NaN loss, out of memory and a failing save each end a run with the last good
state on disk and a clear message; the next run in the same process works."""
from __future__ import annotations

import errno
import os

import pytest
import torch

import trainers.loop
from core import events as ev
from core.jobs import FAILED, JobRunner
from tests.conftest import RecordingContext
from tests.test_textual_inversion import make_embedding, ti_config
from trainers.formats.embedding import embedding_checksum, load_embedding
from trainers.formats.optim_sidecar import load_optim, optim_path
from trainers.formats.safe_load import safe_torch_load
from trainers.loop import TrainingError
from trainers.methods.textual_inversion import run
from trainers.models import load_model


def fail_at(monkeypatch, call: int, make):
    """Make trainers.loop's diffusion_loss misbehave on its `call`-th call (1-based)."""
    real = trainers.loop.diffusion_loss
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            return make(real, *args, **kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(trainers.loop, "diffusion_loss", patched)
    return calls


def sidecar_step(path) -> int:
    return safe_torch_load(optim_path(path))["danlu"]["step"]


def test_nan_loss_stops_at_once_with_the_weights_before_it_saved(data_paths, photo_dataset,
                                                              monkeypatch):
    path = make_embedding(data_paths)
    fail_at(monkeypatch, 4, lambda real, *a, **k: real(*a, **k) * float("nan"))
    ctx = RecordingContext(data_paths)
    with pytest.raises(TrainingError) as caught:
        run(ti_config(photo_dataset, steps=8), ctx)
    message = caught.value.user_message
    # the weights of step 3 gave the nan loss: the last weights that gave a finite one are step 2's
    assert "loss became nan at step 4" in message and "state of step 2" in message
    assert "lower learning rate" in message
    saved = load_embedding(path)
    assert saved.step == 2 and torch.isfinite(saved.vectors).all()
    assert sidecar_step(path) == 2
    payload, _ = load_optim(path, embedding_checksum(saved.vectors))
    assert payload is not None  # the .optim pairs with the file: resumable
    assert [e.step for e in ctx.of(ev.Progress)] == [1, 2, 3]
    assert [e.kind for e in ctx.of(ev.Saved)] == ["last good state"]

    monkeypatch.undo()  # resuming continues from step 2
    ctx = RecordingContext(data_paths)
    run(ti_config(photo_dataset, steps=5), ctx)
    assert load_embedding(path).step == 5
    assert any("Resuming at step 2" in e.text for e in ctx.of(ev.Status))


def test_inf_loss_on_the_first_step_keeps_the_file_untouched(data_paths, photo_dataset,
                                                              monkeypatch):
    path = make_embedding(data_paths)
    before = path.read_bytes()
    fail_at(monkeypatch, 1, lambda real, *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(TrainingError, match="loss became inf at step 1"):
        run(ti_config(photo_dataset, steps=4), RecordingContext(data_paths))
    assert path.read_bytes() == before and not optim_path(path).exists()


class _NanGradient(torch.autograd.Function):
    """The loss unchanged going forward; NaN for every gradient going back."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _nan_gradient(real, *args, **kwargs):
    return _NanGradient.apply(real(*args, **kwargs))


def test_nan_gradient_stops_at_once_with_the_previous_step_saved(data_paths, photo_dataset,
                                                                  monkeypatch):
    path = make_embedding(data_paths)
    fail_at(monkeypatch, 4, _nan_gradient)  # the loss of step 4 is finite, its gradients not
    ctx = RecordingContext(data_paths)
    with pytest.raises(TrainingError) as caught:
        run(ti_config(photo_dataset, steps=8), ctx)
    message = caught.value.user_message
    assert "gradients became NaN/inf at step 4" in message and "state of step 3" in message
    saved = load_embedding(path)
    assert saved.step == 3 and torch.isfinite(saved.vectors).all()
    assert sidecar_step(path) == 3
    payload, _ = load_optim(path, embedding_checksum(saved.vectors))
    assert payload is not None and all(
        torch.isfinite(v).all() for state in payload["optimizer_state_dict"]["state"].values()
        for v in state.values() if torch.is_tensor(v))
    assert [e.step for e in ctx.of(ev.Progress)] == [1, 2, 3]


def test_skip_mode_skips_a_nan_gradient_step_and_keeps_the_weights_finite(data_paths,
                                                                           photo_dataset,
                                                                           monkeypatch):
    path = make_embedding(data_paths)
    fail_at(monkeypatch, 3, _nan_gradient)
    ctx = RecordingContext(data_paths)
    run(ti_config(photo_dataset, steps=5, on_nan="skip"), ctx)
    saved = load_embedding(path)
    assert saved.step == 5 and torch.isfinite(saved.vectors).all()
    assert [e.step for e in ctx.of(ev.Progress)] == [1, 2, 4, 5]
    assert any(e.text.startswith("Skipped step 3: gradients became NaN/inf")
               for e in ctx.of(ev.Status))


def test_skip_mode_still_stops_when_every_step_is_bad(data_paths, photo_dataset, monkeypatch):
    path = make_embedding(data_paths)
    before = path.read_bytes()
    real = trainers.loop.diffusion_loss
    monkeypatch.setattr(trainers.loop, "diffusion_loss",
                        lambda *a, **k: real(*a, **k) * float("nan"))
    ctx = RecordingContext(data_paths)
    with pytest.raises(TrainingError, match="loss became nan at step 10 in 10 steps in a row"):
        run(ti_config(photo_dataset, steps=50, on_nan="skip"), ctx)
    assert not ctx.of(ev.Progress) and not ctx.of(ev.Saved)
    assert path.read_bytes() == before and not optim_path(path).exists()  # never a good step


def poison_one_gradient(monkeypatch, at_call: int, value: float):
    """On the `at_call`-th check, one element of one gradient (of many) becomes `value`."""
    import trainers.grad_check
    real = trainers.grad_check.gauge
    calls, poisoned = [], []

    def patched(parameters, *args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            with_grads = [p for p in parameters if p.grad is not None]
            victim = with_grads[len(with_grads) // 2]
            victim.grad.view(-1)[victim.grad.numel() // 2] = value
            poisoned.append(len(with_grads))
        return real(parameters, *args, **kwargs)
    monkeypatch.setattr(trainers.grad_check, "gauge", patched)
    return poisoned


def test_one_inf_element_in_one_lora_gradient_of_many_skips_that_step(data_paths, tmp_path,
                                                                       monkeypatch):
    from tests.conftest import photo
    from tests.test_lora_training import lora_config
    from trainers.formats.lora import load_lora
    from trainers.methods.lora import run as run_lora
    folder = tmp_path / "train" / "2_zxq cat"
    folder.mkdir(parents=True)
    for index in range(2):
        photo(index, 64).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"zxq cat, photo {index}")
    poisoned = poison_one_gradient(monkeypatch, 3, float("inf"))
    ctx = RecordingContext(data_paths)
    path = run_lora(lora_config(folder.parent, max_train_steps=5, on_nan="skip"), ctx)
    assert poisoned and poisoned[0] > 50  # one element of one of many gradients
    assert [e.step for e in ctx.of(ev.Progress)] == [1, 2, 4, 5]
    assert any(e.text.startswith("Skipped step 3: gradients became NaN/inf")
               for e in ctx.of(ev.Status))
    assert all(torch.isfinite(t).all() for t in load_lora(path)[0].values())


def test_one_nan_element_with_norm_clipping_stops_a_hypernetwork_run(data_paths, photo_dataset,
                                                                      monkeypatch):
    from tests.test_hypernetwork_training import hn_config, make
    from trainers.methods.hypernetwork import run as run_hn
    make(data_paths)
    poisoned = poison_one_gradient(monkeypatch, 2, float("nan"))
    ctx = RecordingContext(data_paths)
    with pytest.raises(TrainingError, match="gradients became NaN/inf at step 2"):
        run_hn(hn_config(photo_dataset, steps=4, clip_grad_mode="norm", clip_grad_value="1.0"),
               ctx)
    assert poisoned and poisoned[0] > 4
    assert [e.step for e in ctx.of(ev.Progress)] == [1]
    assert [e.kind for e in ctx.of(ev.Saved)] == ["last good state"]


def _out_of_memory(real, unet, *args, **kwargs):
    real(unet, *args, **kwargs).backward()  # gradients left behind, as an OOM in backward leaves
    for module in (unet, unet.up_blocks):  # and on the shared base model (a full fine-tune)
        weight = next(module.parameters())
        weight.grad = torch.ones_like(weight)
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; "
                                 "7.79 GiB total capacity)")


def test_out_of_memory_gives_advice_saves_nothing_and_the_next_run_works(data_paths,
                                                                         photo_dataset,
                                                                         monkeypatch):
    path = make_embedding(data_paths)
    ctx = RecordingContext(data_paths)
    run(ti_config(photo_dataset, steps=2), ctx)  # a saved state at step 2
    before = path.read_bytes(), optim_path(path).read_bytes()

    fail_at(monkeypatch, 2, _out_of_memory)
    runner = JobRunner(data_paths)
    job = runner.submit("ti", "train", lambda c: run(ti_config(photo_dataset, steps=6), c))
    assert runner.wait(job, 120)
    assert job.state == FAILED
    message = job.result.message
    assert message.startswith("Out of memory (CUDA out of memory. Tried to allocate 2.00 GiB")
    for advice in ["batch size", "gradient accumulation", "gradient checkpointing",
                   "resolution", "8-bit optimizer", "mixed precision"]:
        assert advice in message, advice
    assert "zxqtok.pt keeps its last saved state" in message
    assert (path.read_bytes(), optim_path(path).read_bytes()) == before  # nothing new saved
    assert [e.step for e in job.saved] == []

    model = load_model(data_paths, "tiny-demo")  # the cached model the next job gets
    for part in (model.unet, model.text_encoder, model.vae):
        assert all(p.grad is None for p in part.parameters())

    monkeypatch.undo()
    job = runner.submit("ti", "train", lambda c: run(ti_config(photo_dataset, steps=4), c))
    assert runner.wait(job, 120) and job.state == "done", job.result
    assert load_embedding(path).step == 4 and sidecar_step(path) == 4


def test_cpu_allocator_failures_count_as_out_of_memory():
    assert trainers.loop._is_out_of_memory(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 17179869184 bytes"))
    assert not trainers.loop._is_out_of_memory(RuntimeError("mat1 and mat2 shapes differ"))
    assert not trainers.loop._is_out_of_memory(TrainingError("out of memory? no: a message"))


def test_a_save_failing_mid_write_leaves_the_old_files_loadable(data_paths, photo_dataset,
                                                                monkeypatch):
    path = make_embedding(data_paths)
    run(ti_config(photo_dataset, steps=2), RecordingContext(data_paths))
    old_file, old_optim = path.read_bytes(), optim_path(path).read_bytes()
    real_save = torch.save

    def disk_full(obj, target, *args, **kwargs):
        real_save(obj, target, *args, **kwargs)
        with open(target, "r+b") as handle:  # half of it written, then the disk is full
            handle.truncate(os.path.getsize(target) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)

    runner = JobRunner(data_paths)
    job = runner.submit("ti", "train", lambda c: run(ti_config(photo_dataset, steps=4), c))
    assert runner.wait(job, 120) and job.state == FAILED
    assert "No space left on device" in job.result.message
    monkeypatch.undo()

    assert path.read_bytes() == old_file and optim_path(path).read_bytes() == old_optim
    saved = load_embedding(path)
    assert saved.step == 2
    assert load_optim(path, embedding_checksum(saved.vectors))[0] is not None
    assert sorted(os.listdir(path.parent)) == ["zxqtok.pt", "zxqtok.pt.optim"]  # no temp files
