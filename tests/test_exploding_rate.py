"""A learning rate that makes the weights explode: whatever stops the run (a nan/inf loss, or a
save refused because the weights overflow the save precision), the file left on disk is finite
in the precision it was saved in, pairs with its .optim sidecar, keeps every step saved before
the explosion, and training it on at a sane rate gives finite losses. Every method, each save
precision it offers (textual inversion, APT, XTI and hypernetworks always save fp32)."""
from __future__ import annotations

import math

import pytest
import safetensors.torch
import torch

from core import events as ev
from tests.conftest import RecordingContext, photo
from tests.test_apt import apt_config
from tests.test_dreambooth import db_config
from tests.test_fine_tune import ft_config, write_json
from tests.test_hypernetwork_training import hn_config, make as make_hypernetwork
from tests.test_lora_training import lora_config
from tests.test_textual_inversion import make_embedding, ti_config
from trainers.formats.embedding import load_embedding
from trainers.formats.hypernetwork import load_hypernetwork
from trainers.formats.lora import load_lora
from trainers.formats.optim_sidecar import optim_path
from trainers.formats.safe_load import safe_torch_load
from trainers.formats.xti import load_xti
from trainers.loop import TrainingError

SANE, EXPLODING = 1e-3, 1e6


def _template(method, paths, tmp_path):
    """(config(rate, steps), the file, its step) for a method trained from A1111 templates."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a photo")
    common = dict(width=32, height=32, save_every=1)
    if method == "textual_inversion":
        from trainers.methods.textual_inversion import run
        path = make_embedding(paths)
        return (run, lambda rate, steps: ti_config(folder, learn_rate=str(rate), steps=steps,
                                                   **common),
                path, lambda: load_embedding(path).step)
    if method == "apt":
        from trainers.methods.apt import run
        path = make_embedding(paths, name="zxq")
        return (run, lambda rate, steps: apt_config(folder, learn_rate=str(rate), steps=steps,
                                                    **common),
                path, lambda: load_embedding(path).step)
    if method == "hypernetwork":
        from trainers.methods.hypernetwork import run
        path = make_hypernetwork(paths)
        return (run, lambda rate, steps: hn_config(folder, learn_rate=str(rate), steps=steps,
                                                   **common),
                path, lambda: load_hypernetwork(path).step)
    from trainers.configs import XtiConfig
    from trainers.methods.xti import run
    path = paths.models / "xti" / "xtok.safetensors"
    return (run, lambda rate, steps: XtiConfig(
        model="tiny-demo", output_name="xtok", data_root=str(folder), learn_rate=str(rate),
        steps=steps, preview_every=0, seed=2, template="subject_filewords.txt",
        **common).validate(), path, lambda: load_xti(path).step)


def _kohya(method, paths, tmp_path, precision):
    folder = tmp_path / "train" / "1_zxq"
    folder.mkdir(parents=True)
    for i in range(2):
        photo(i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("zxq, a photo")
    common = dict(save_every_n_steps=1, save_precision=precision, max_grad_norm=0.0,
                  resolution=32, max_bucket_reso=64)
    if method == "lora":
        from trainers.methods.lora import run
        path = paths.lora / "mylora.safetensors"
        return (run, lambda rate, steps: lora_config(folder.parent, learning_rate=rate,
                                                     max_train_steps=steps, **common),
                path, lambda: int(load_lora(path)[1]["ss_steps"]))
    if method == "dreambooth":
        from trainers.methods.dreambooth import run
        make = lambda rate, steps: db_config(folder, learning_rate=rate,  # noqa: E731
                                             max_train_steps=steps, **common)
        path = paths.stable_diffusion / "mydb.safetensors"
    else:
        from trainers.methods.fine_tune import run
        meta = write_json(tmp_path / "meta.json", {f"img{i}": {"caption": "zxq, a photo"}
                                                   for i in range(2)})
        make = lambda rate, steps: ft_config(folder, meta, learning_rate=rate,  # noqa: E731
                                             max_train_steps=steps, **common)
        path = paths.stable_diffusion / "myft.safetensors"

    def step() -> int:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            return int(handle.metadata()["danlu.steps"])
    return run, make, path, step


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def stored_tensors(path):
    """The floating tensors exactly as the file stores them (in their saved dtype)."""
    data = (safetensors.torch.load_file(str(path)) if path.suffix == ".safetensors"
            else safe_torch_load(path))
    return [t for t in _tensors(data) if t.is_floating_point()]


CASES = [("textual_inversion", "fp32"), ("apt", "fp32"), ("xti", "fp32"),
         ("hypernetwork", "fp32"), ("lora", "fp16"), ("lora", "fp32"), ("dreambooth", "fp16"),
         ("dreambooth", "fp32"), ("fine_tune", "fp16"), ("fine_tune", "fp32")]


@pytest.mark.parametrize("method,precision", CASES)
def test_an_exploding_rate_leaves_a_finite_resumable_file(method, precision, data_paths,
                                                          tmp_path):
    if method in ("lora", "dreambooth", "fine_tune"):
        run, make, path, file_step = _kohya(method, data_paths, tmp_path, precision)
    else:
        run, make, path, file_step = _template(method, data_paths, tmp_path)
    run(make(SANE, 2), RecordingContext(data_paths))
    assert file_step() == 2

    ctx = RecordingContext(data_paths)
    try:
        run(make(EXPLODING, 5), ctx)
        stopped = None
    except TrainingError as error:
        stopped = error.user_message
    if stopped is not None:
        assert "Try a lower learning rate" in stopped
        assert ("nan" in stopped or "inf" in stopped or f"overflow {precision}" in stopped), \
            stopped
        if "cannot be saved" in stopped:  # names the precision and the largest value
            assert "overflow fp16 (largest 1" in stopped and "fp16 holds up to 65504" in stopped

    kept = file_step()
    assert kept >= 2  # nothing saved before the explosion was lost
    stored = stored_tensors(path)
    assert stored and all(torch.isfinite(t).all() for t in stored), \
        f"{path.name} holds nan/inf in its saved precision after: {stopped}"
    assert safe_torch_load(optim_path(path))["danlu"]["step"] == kept  # one pair, one step
    if stopped is not None:
        assert f"state of step {kept}" in stopped

    ctx = RecordingContext(data_paths)
    run(make(SANE, kept + 1), ctx)
    assert file_step() == kept + 1
    assert ctx.losses and all(math.isfinite(loss) for loss in ctx.losses)
    if method != "apt":  # (APT's sidecar is found from the pair's checksum, not a message)
        assert any(f"Resuming at step {kept}" in e.text for e in ctx.of(ev.Status))


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_a_new_lora_that_explodes_at_once_writes_no_broken_file(on_nan, data_paths, tmp_path):
    """The report's case: a new LoRA at rate 1e6, fp16, no periodic saves. Its first step's
    weights overflow fp16 and give a nan loss, so no weights are good to keep: no file."""
    run, make, path, _ = _kohya("lora", data_paths, tmp_path, "fp16")
    cfg = lora_config(tmp_path / "train", learning_rate=EXPLODING, max_train_steps=4,
                      save_precision="fp16", max_grad_norm=0.0, on_nan=on_nan)
    with pytest.raises(TrainingError) as caught:
        run(cfg, RecordingContext(data_paths))
    message = caught.value.user_message
    assert "nothing was saved (mylora.safetensors does not exist)" in message, message
    assert not path.exists() and not optim_path(path).exists()
    assert list(path.parent.iterdir()) == []  # no temporary or journal file either
    ctx = RecordingContext(data_paths)  # a lower rate trains from the start
    run(make(SANE, 2), ctx)
    assert len(ctx.losses) == 2 and all(math.isfinite(loss) for loss in ctx.losses)
