"""full_fp16 (#19): the trained model in fp16 with loss scaling and a stochastically rounded fp32
step. Tiny updates that a plain fp16 step loses still move the weights as far as fp32 does;
fp16 gradients are unscaled (torch's GradScaler alone refuses them); overflowing steps are
skipped and said; a resumed run repeats exactly, loss scale included; wrong settings are
refused by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.events import Status
from tests.conftest import RecordingContext, repeat_with_interruption
from tests.test_dreambooth import db_config
from tests.test_full_bf16 import _instance, _unet
from trainers.configs import DreamBoothConfig, FineTuneConfig
from trainers.loss_scaling import LossScaler
from trainers.optimizers import create_optimizer
from trainers.stochastic_rounding import StochasticRounding, round_into_


def test_fp16_rounding_is_unbiased_and_lands_on_a_neighbour():
    source = torch.full((100_000,), 1.0 + 2 ** -12)  # a quarter of the way to the next fp16
    target = torch.empty(100_000, dtype=torch.float16)
    round_into_(target, source, torch.Generator().manual_seed(0))
    assert set(target.float().unique().tolist()) == {1.0, 1.0 + 2 ** -10}
    assert target.float().mean().item() == pytest.approx(1.0 + 2 ** -12, abs=2e-5)
    exact = torch.tensor([1.5, -2.25, 0.0, 2 ** -20])  # fp16 values (a subnormal too) stay
    kept = torch.empty(4, dtype=torch.float16)
    round_into_(kept, exact, torch.Generator().manual_seed(1))
    assert kept.float().tolist() == exact.tolist()
    big = torch.empty(1, dtype=torch.float16)
    round_into_(big, torch.tensor([70000.0]), torch.Generator().manual_seed(2))
    assert big.item() == 65504.0  # the largest fp16, not inf


@pytest.mark.parametrize("name", ["AdamW", "Adafactor"])
def test_tiny_updates_move_fp16_weights_as_fp32_does(name):
    """lr 1e-4 on weights of 1.0: each update is a fifth of half an fp16 step (2^-11)."""
    steps, moved = 40, {}
    for kind in ("fp32", "fp16 plain", "fp16 rounded"):
        dtype = torch.float32 if kind == "fp32" else torch.float16
        weight = torch.nn.Parameter(torch.ones(20_000, dtype=dtype))
        optimizer = create_optimizer(name, [{"params": [weight], "lr": 1e-4}], 1e-4)
        scaler = LossScaler("cpu") if kind != "fp32" else None
        if kind == "fp16 rounded":
            StochasticRounding(optimizer, seed=5)
        for _ in range(steps):
            loss = weight.float().sum() / 2  # pushes every weight down (scaled: 32768)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(optimizer)  # unscales the fp16 gradients first
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        assert weight.dtype == dtype
        moved[kind] = 1.0 - weight.detach().float().mean().item()
    assert moved["fp32"] > 1e-3
    assert moved["fp16 plain"] == 0.0  # every update was rounded away
    assert moved["fp16 rounded"] == pytest.approx(moved["fp32"], rel=0.1)


def test_torch_alone_refuses_fp16_gradients_and_the_loss_scaler_unscales_them():
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for scaler, refused in ((torch.amp.GradScaler("cpu"), True), (LossScaler("cpu"), False)):
        scaler.scale(weight.float().sum() / 4).backward()  # 16384 per element
        if refused:
            with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
                scaler.unscale_(optimizer)
        else:
            scaler.unscale_(optimizer)
            assert weight.grad.dtype == torch.float16 and torch.all(weight.grad == 0.25)
        optimizer.zero_grad(set_to_none=True)


@pytest.fixture
def fp16_on_the_cpu(monkeypatch):
    """Danlu refuses fp16 compute without a CUDA GPU (CPU kernels for it are few and slow); the
    tests run it anyway, since torch's CPU autocast has fp16."""
    if not torch.cuda.is_available():
        monkeypatch.setattr("trainers.models.precision_problems", lambda precision: [])


def _base_unet(paths):
    from trainers.models import load_model
    return {k: v.clone() for k, v in load_model(paths, "tiny-demo").unet.state_dict().items()}


def test_full_fp16_dreambooth_trains_fp16_weights_and_resumes_exactly(data_paths, tmp_path,
                                                                       monkeypatch,
                                                                       fp16_on_the_cpu):
    from trainers.methods import dreambooth
    seen = []
    original = StochasticRounding.step_one

    def spy(self, param, group):
        seen.append(param.dtype)
        original(self, param, group)
    monkeypatch.setattr(StochasticRounding, "step_one", spy)
    # a scale this high overflows at first: the scaler lowers it as the run goes, and the
    # resumed run must go on with the lowered scale
    monkeypatch.setattr("trainers.loss_scaling.INIT_SCALE", 2.0 ** 22)
    cfg = db_config(_instance(tmp_path), max_train_steps=6, mixed_precision="fp16",
                    full_fp16=True, optimizer_type="AdamW", save_precision="fp16",
                    save_every_n_steps=3)
    path = data_paths.stable_diffusion / "mydb.safetensors"

    def reset():
        for leftover in (path, path.with_name(path.name + ".optim")):
            leftover.unlink(missing_ok=True)
    whole, _, _ = repeat_with_interruption(dreambooth.run, cfg, data_paths,
                                           load=lambda p: _unet(data_paths), reset=reset,
                                           stop_after=3)
    assert seen and set(seen) == {torch.float16}
    assert np.all(np.isfinite(whole.losses))
    skipped = [e.text for e in whole.of(Status) if "overflowed at loss scale" in e.text]
    assert skipped and skipped[0].startswith("Step 1: the fp16 gradients overflowed at loss "
                                             "scale 4.1943e+06; the scaler skipped this update")
    assert len(skipped) < 6, skipped  # the scale came down far enough to train
    base = _base_unet(data_paths)
    tuned = _unet(data_paths)
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    from trainers.models import load_model
    assert load_model(data_paths, "tiny-demo").text_encoder.dtype == torch.float32


def test_overflowing_steps_leave_the_weights_as_they_were(data_paths, tmp_path, monkeypatch,
                                                          fp16_on_the_cpu):
    from trainers.methods import dreambooth
    monkeypatch.setattr("trainers.loss_scaling.INIT_SCALE", 2.0 ** 100)  # every step overflows
    ctx = RecordingContext(data_paths)
    dreambooth.run(db_config(_instance(tmp_path), max_train_steps=3, mixed_precision="fp16",
                             full_fp16=True, save_precision="fp16"), ctx)
    said = [e.text for e in ctx.of(Status) if "overflowed" in e.text]
    assert [text.split(":")[0] for text in said] == ["Step 1", "Step 2", "Step 3"]
    base = _base_unet(data_paths)
    tuned = _unet(data_paths)
    assert all(torch.equal(base[k].half().float(), tuned[k].float()) for k in base)


@pytest.mark.parametrize("changes, words", [
    ({"full_fp16": True}, "full_fp16: needs mixed precision fp16"),
    ({"full_fp16": True, "mixed_precision": "bf16"}, "full_fp16: needs mixed precision fp16"),
    ({"full_fp16": True, "full_bf16": True, "mixed_precision": "fp16"},
     "full_fp16: the whole model is kept in fp16 or in bf16 \\(full_bf16\\), not both"),
    ({"full_fp16": True, "mixed_precision": "fp16", "fused_backward_pass": True,
      "max_grad_norm": 0.0}, "fused_backward_pass"),
])
def test_full_fp16_settings_are_refused_by_name(changes, words):
    base = dict(model="m", output_name="o", train_data_dir="d")
    for cls, extra in ((DreamBoothConfig, {}), (FineTuneConfig, {"in_json": "m.json"})):
        with pytest.raises(ConfigError, match=words):
            cls(**{**base, **extra, **changes}).validate()
    DreamBoothConfig(**base, full_fp16=True, mixed_precision="fp16").validate()


def test_the_estimate_and_fit_my_gpu_on_a_t4(data_paths, monkeypatch):
    from trainers.memory_estimate import estimate
    from trainers.vram_fit import card_for, fit
    plain = estimate(DreamBoothConfig(mixed_precision="fp16"), "sdxl")
    half = estimate(DreamBoothConfig(mixed_precision="fp16", full_fp16=True), "sdxl")
    assert plain.parts["weights"] - half.parts["weights"] == pytest.approx(2567.5e6 * 2)
    assert half.parts["gradients"] == pytest.approx(plain.parts["gradients"] / 2)
    # the same choices whether or not bitsandbytes is installed here
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object())
    cfg = DreamBoothConfig(model="sd15.safetensors", output_name="x", train_data_dir="d",
                           instance_prompt="a zxq dog", resolution=1024, use_ema=True).validate()
    fitted, said = fit(cfg, data_paths, card_for("16 GB (Colab T4)"))
    assert fitted.full_fp16 and fitted.mixed_precision == "fp16" and not fitted.full_bf16
    assert "full fp16: the trained weights and gradients in fp16 with loss scaling" in said
    fitted.validate()
    roomy, _ = fit(cfg, data_paths, card_for("24 GB"))  # a bf16 card: full bf16 if anything
    assert not roomy.full_fp16
