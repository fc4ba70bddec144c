"""full_bf16 (#19 item 1): the trained model in bf16 with a stochastically rounded fp32 step.
Updates far below half a bf16 step still move the weights on average (a plain bf16 step loses
every one of them), the rounding is exact from a resumed run, and the settings it needs are
asked for by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError
from tests.conftest import RecordingContext, photo, repeat_with_interruption
from tests.test_dreambooth import db_config
from trainers.configs import DreamBoothConfig, FineTuneConfig
from trainers.optimizers import create_optimizer
from trainers.stochastic_rounding import StochasticRounding, round_into_


def test_rounding_is_unbiased_and_lands_on_a_neighbour():
    source = torch.full((100_000,), 1.0 + 2 ** -9)  # a quarter of the way to the next bf16
    target = torch.empty(100_000, dtype=torch.bfloat16)
    round_into_(target, source, torch.Generator().manual_seed(0))
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert target.float().mean().item() == pytest.approx(1.0 + 2 ** -9, abs=6e-5)  # 5 standard errors
    exact = torch.tensor([1.5, -2.25, 0.0])  # already bf16 values stay as they are
    kept = torch.empty(3, dtype=torch.bfloat16)
    round_into_(kept, exact, torch.Generator().manual_seed(1))
    assert kept.float().tolist() == exact.tolist()


@pytest.mark.parametrize("name", ["AdamW", "Adafactor"])
def test_tiny_updates_move_bf16_weights_on_average(name):
    """lr 1e-4 on weights of 1.0: each update is under a tenth of half a bf16 step (2^-8)."""
    steps, moved = 40, {}
    for kind in ("fp32", "bf16 plain", "bf16 rounded"):
        dtype = torch.float32 if kind == "fp32" else torch.bfloat16
        weight = torch.nn.Parameter(torch.ones(20_000, dtype=dtype))
        optimizer = create_optimizer(name, [{"params": [weight], "lr": 1e-4}], 1e-4)
        if kind == "bf16 rounded":
            StochasticRounding(optimizer, seed=5)
        for step in range(steps):
            weight.grad = torch.ones_like(weight)  # always pushes the weights down
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert weight.dtype == dtype
        moved[kind] = 1.0 - weight.detach().float().mean().item()
    assert moved["fp32"] > 1e-3
    assert moved["bf16 plain"] == 0.0  # every update was rounded away
    assert moved["bf16 rounded"] == pytest.approx(moved["fp32"], rel=0.1)


def _instance(tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
    return folder


def _unet(paths):
    from trainers.models import load_model
    return {k: v.clone() for k, v in load_model(paths, "mydb.safetensors").unet.state_dict().items()}


@pytest.mark.parametrize("fused", [False, True])
def test_full_bf16_dreambooth_trains_bf16_weights_and_resumes_exactly(data_paths, tmp_path,
                                                                       monkeypatch, fused):
    from trainers.methods import dreambooth
    seen = []
    original = StochasticRounding.step_one

    def spy(self, param, group):
        seen.append(param.dtype)
        original(self, param, group)
    monkeypatch.setattr(StochasticRounding, "step_one", spy)
    loads, real_load = [], dreambooth.load_model

    def load(*args, **kwargs):
        loads.append(kwargs.get("frozen_dtype"))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(dreambooth, "load_model", load)
    cfg = db_config(_instance(tmp_path), max_train_steps=4, mixed_precision="bf16",
                    full_bf16=True, optimizer_type="AdamW", save_precision="fp16",
                    save_every_n_steps=2, **({"fused_backward_pass": True, "max_grad_norm": 0.0}
                                             if fused else {}))
    path = data_paths.stable_diffusion / "mydb.safetensors"

    def reset():
        for leftover in (path, path.with_name(path.name + ".optim")):
            leftover.unlink(missing_ok=True)
    whole, _, _ = repeat_with_interruption(dreambooth.run, cfg, data_paths,
                                           load=lambda p: _unet(data_paths), reset=reset)
    assert seen and set(seen) == {torch.bfloat16}
    assert loads and set(loads) == {"bf16"}  # loaded in bf16: the GPU never holds it in fp32
    assert np.all(np.isfinite(whole.losses))
    from trainers.models import load_model
    base = load_model(data_paths, "tiny-demo").unet.state_dict()
    tuned = _unet(data_paths)
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    # the next job gets the cached model's frozen parts back in fp32
    assert load_model(data_paths, "tiny-demo").text_encoder.dtype == torch.float32


@pytest.mark.parametrize("changes, words", [
    ({"full_bf16": True}, "full_bf16: needs mixed precision bf16"),
    ({"full_bf16": True, "mixed_precision": "fp16"}, "full_bf16: needs mixed precision bf16"),
])
def test_full_bf16_needs_bf16_mixed_precision(changes, words):
    base = dict(model="m", output_name="o", train_data_dir="d")
    for cls, extra in ((DreamBoothConfig, {}), (FineTuneConfig, {"in_json": "m.json"})):
        with pytest.raises(ConfigError, match=words):
            cls(**{**base, **extra, **changes}).validate()
    DreamBoothConfig(**base, full_bf16=True, mixed_precision="bf16").validate()


def test_the_estimate_counts_bf16_weights_and_fused_gradients():
    from trainers.memory_estimate import FUSED_GRADIENTS, estimate
    plain = estimate(DreamBoothConfig(mixed_precision="bf16", optimizer_type="Adafactor"), "sdxl")
    half = estimate(DreamBoothConfig(mixed_precision="bf16", optimizer_type="Adafactor",
                                     full_bf16=True), "sdxl")
    fused = estimate(DreamBoothConfig(mixed_precision="bf16", optimizer_type="Adafactor",
                                      full_bf16=True, fused_backward_pass=True,
                                      max_grad_norm=0.0), "sdxl")
    assert plain.parts["weights"] - half.parts["weights"] == pytest.approx(2567.5e6 * 2)
    assert half.parts["gradients"] == pytest.approx(plain.parts["gradients"] / 2)
    assert fused.parts["gradients"] == pytest.approx(half.parts["gradients"] * FUSED_GRADIENTS)


def test_fit_my_gpu_picks_the_fused_pass_and_full_bf16_for_full_fine_tuning(data_paths):
    from trainers.vram_fit import card_for, fit
    cfg = DreamBoothConfig(model="sd15.safetensors", output_name="x", train_data_dir="d",
                           instance_prompt="a zxq dog", resolution=1024).validate()
    fitted, said = fit(cfg, data_paths, card_for("8 GB"))
    assert fitted.fused_backward_pass and fitted.full_bf16
    assert (fitted.optimizer_type, fitted.max_grad_norm, fitted.mixed_precision) == (
        "Adafactor", 0.0, "bf16")
    assert "fused backward pass with Adafactor" in said and "full bf16" in said
    fitted.validate()  # kohya's limits hold for what it chose
    t4, said = fit(cfg, data_paths, card_for("16 GB (Colab T4)"))  # fp16: neither applies
    assert not t4.fused_backward_pass and not t4.full_bf16
