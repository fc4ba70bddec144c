"""Fused backward pass (#19 item 4): each weight is stepped as its gradient is complete and the
gradient freed. The losses and weights after N steps equal the unfused run's (bit for bit on
the CPU, with AdamW and Adafactor), an interrupted run resumes exactly, at most one
parameter's gradient is alive at a time, and kohya's limits are refused by name."""
from __future__ import annotations

import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, photo, repeat_with_interruption
from tests.test_dreambooth import db_config
from trainers import fused_backward
from trainers.configs import DreamBoothConfig, FineTuneConfig
from trainers.fused_backward import FusedBackward
from trainers.optimizers import create_optimizer


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize("name", ["AdamW", "Adafactor"])
def test_stepping_each_parameter_in_backward_is_the_whole_step(name):
    nets, alive = [], []
    for fused in (False, True):
        net = _net()
        optimizer = create_optimizer(name, [{"params": list(net.parameters()), "lr": 1e-2}], 1e-2)
        hook = FusedBackward(optimizer) if fused else None
        if hook is not None:
            hook.__enter__()
            net[0].weight.register_post_accumulate_grad_hook(
                lambda _: alive.append(sum(p.grad is not None for p in net.parameters())))
        for step in range(5):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            loss = net(x).pow(2).mean()
            loss.backward()
            if hook is None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                assert all(p.grad is None for p in net.parameters())
        if hook is not None:
            hook.__exit__(None, None, None)
        nets.append(net)
    for plain, fused in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(plain, fused)
    # the first layer's weight is the last to get its gradient: only it and its bias are alive
    assert max(alive) <= 2


def _instance(tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
    return folder


def _unet_weights(paths):
    from trainers.models import load_model
    return {k: v.clone() for k, v in load_model(paths, "mydb.safetensors").unet.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["Adafactor", "AdamW"])
def test_dreambooth_fused_equals_unfused(data_paths, tmp_path, optimizer, monkeypatch):
    from trainers.methods.dreambooth import run
    folder = _instance(tmp_path)
    runs, peak = {}, {"fused": 0}
    original = FusedBackward._step

    def counting(self, param, group):  # the gradients alive when one completes
        alive = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        peak["fused"] = max(peak["fused"], sum(p.grad.numel() * p.grad.element_size()
                                               for p in alive))
        original(self, param, group)
    monkeypatch.setattr(FusedBackward, "_step", counting)
    for fused in (False, True):
        ctx = RecordingContext(data_paths)
        run(db_config(folder, max_train_steps=3, optimizer_type=optimizer, max_grad_norm=0.0,
                      fused_backward_pass=fused, overwrite=True), ctx)
        runs[fused] = (ctx.losses, _unet_weights(data_paths))
    assert runs[True][0] == runs[False][0]
    for key, value in runs[False][1].items():
        assert torch.equal(value, runs[True][1][key]), key
    from trainers.models import load_model
    every = sum(p.numel() * 4 for p in load_model(data_paths, "tiny-demo").unet.parameters())
    # unfused, every U-Net gradient is alive at the step; fused, at most the largest few
    assert 0 < peak["fused"] < every / 4


def test_fused_dreambooth_resumes_exactly(data_paths, tmp_path):
    from trainers.methods.dreambooth import run
    folder = _instance(tmp_path)
    cfg = db_config(folder, max_train_steps=4, optimizer_type="Adafactor", max_grad_norm=0.0,
                    fused_backward_pass=True, save_every_n_steps=2, save_precision="fp16")
    path = data_paths.stable_diffusion / "mydb.safetensors"

    def reset():
        for leftover in (path, path.with_name(path.name + ".optim")):
            leftover.unlink(missing_ok=True)
    repeat_with_interruption(run, cfg, data_paths, load=lambda p: _unet_weights(data_paths),
                             reset=reset)


@pytest.mark.parametrize("changes, words", [
    ({"optimizer_type": "Lion"}, "optimizer_type: the fused backward pass steps AdamW or "
                                 "Adafactor one parameter at a time, not Lion"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps: the fused backward"),
    ({"max_grad_norm": 1.0}, "max_grad_norm: the fused backward pass cannot clip"),
    ({"mixed_precision": "fp16"}, "mixed_precision: fp16 loss scaling"),
    ({"on_nan": "skip"}, "on_nan: with the fused backward pass"),
])
def test_kohyas_limits_are_refused_by_name(changes, words):
    base = dict(model="m", output_name="o", train_data_dir="d", fused_backward_pass=True,
                max_grad_norm=0.0, optimizer_type="Adafactor")
    for cls, extra in ((DreamBoothConfig, {}), (FineTuneConfig, {"in_json": "m.json"})):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
            cls(**{**base, **extra, **changes}).validate()
    assert fused_backward.problems("AdamW", 1, 0.0, "bf16", "stop") == []
