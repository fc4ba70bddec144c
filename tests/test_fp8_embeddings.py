"""fp8 base weights for the template methods (#19): textual inversion, hypernetworks, XTI and APT
train on a U-Net whose Linear / conv weights are stored in 8 bits (trainers/fp8_weights.py),
close to the bf16 run; the files they save are the same format and load as before; previews
render; the next job gets its normal weights back; bad settings are refused by name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.config import ConfigError
from core.events import Preview
from tests.conftest import RecordingContext
from tests.test_hypernetwork_training import hn_config, make as make_hypernetwork
from tests.test_textual_inversion import make_embedding, ti_config
from trainers import models
from trainers.formats.embedding import load_embedding
from trainers.formats.hypernetwork import load_hypernetwork
from trainers.fp8_weights import FP8


def _unet_weight_bytes(unet) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in unet.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)))


def _seen_by_the_loop(monkeypatch) -> dict:
    """The U-Net the loop trains on, as it was stored, recorded on the first step."""
    from trainers import loop
    seen = {}
    original = loop.train

    def spy(model, *args, **kwargs):
        seen["weights"] = {m.weight.dtype for m in model.unet.modules()
                           if isinstance(m, (nn.Linear, nn.Conv2d))}
        seen["bytes"] = _unet_weight_bytes(model.unet)
        seen["frozen"] = model.frozen_dtype
        return original(model, *args, **kwargs)

    for module in ("textual_inversion", "hypernetwork", "xti", "apt"):
        monkeypatch.setattr(f"trainers.methods.{module}.train", spy)
    return seen


def test_textual_inversion_trains_on_fp8_weights_close_to_bf16(data_paths, photo_dataset,
                                                                monkeypatch):
    from trainers.methods.textual_inversion import run
    seen = _seen_by_the_loop(monkeypatch)
    runs = {}
    for precision in ("bf16", "fp8"):
        path = make_embedding(data_paths, name=f"tok{precision}")
        ctx = RecordingContext(data_paths)
        run(ti_config(photo_dataset, embedding=f"tok{precision}", steps=6, preview_every=6,
                      preview_steps=2, mixed_precision="bf16", fp8_base=precision == "fp8"), ctx)
        runs[precision] = (dict(seen), np.array(ctx.losses), ctx, path)
    bf16, fp8 = runs["bf16"][0], runs["fp8"][0]
    assert bf16["weights"] == {torch.bfloat16} and fp8["weights"] == {FP8}
    assert fp8["frozen"] == "fp8" and fp8["bytes"] * 2 == bf16["bytes"]
    losses_bf16, losses_fp8 = runs["bf16"][1], runs["fp8"][1]
    assert len(losses_fp8) == 6 and np.all(np.isfinite(losses_fp8))
    assert abs(losses_fp8.mean() - losses_bf16.mean()) < 0.1 * losses_bf16.mean()
    assert [p.step for p in runs["fp8"][2].of(Preview)] == [6]

    # the same file as an fp32 run writes: fp32 vectors, loads in diffusers, changes the image
    path = runs["fp8"][3]
    stored = load_embedding(path)
    assert stored.step == 6 and stored.vectors.dtype == torch.float32
    assert stored.vectors.shape == load_embedding(runs["bf16"][3]).vectors.shape
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"string_to_param", "name", "step"}
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(data_paths.cache / "tiny-demo",
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe("a photo of tokfp8", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    base = image()
    pipe.load_textual_inversion(str(path), token="tokfp8")
    assert not np.allclose(base, image())

    # the cached model is the fp8 one; the next fp32 job (another method) gets fp32 weights
    assert models.cached_model(data_paths, "tiny-demo") is None
    fp32 = models.load_model(data_paths, "tiny-demo")
    assert fp32.frozen_dtype == "fp32"
    assert {m.weight.dtype for m in fp32.unet.modules() if isinstance(m, nn.Linear)} == \
        {torch.float32}
    assert not any(hasattr(m, "fp8_scale") for m in fp32.unet.modules())


def test_a_hypernetwork_trains_on_fp8_weights_and_saves_the_same_file(data_paths,
                                                                      photo_dataset,
                                                                      monkeypatch):
    from trainers.methods.hypernetwork import render_with, run
    from trainers.sampling import PreviewSettings
    seen = _seen_by_the_loop(monkeypatch)
    losses, files = {}, {}
    for precision in ("bf16", "fp8"):
        files[precision] = make_hypernetwork(data_paths, name=f"hn{precision}")
        ctx = RecordingContext(data_paths)
        run(hn_config(photo_dataset, hypernetwork=f"hn{precision}", preview_every=6,
                      preview_steps=2, mixed_precision="bf16", fp8_base=precision == "fp8"), ctx)
        losses[precision] = np.array(ctx.losses)
        if precision == "fp8":
            assert seen["weights"] == {FP8} and [p.step for p in ctx.of(Preview)] == [6]
    assert np.all(np.isfinite(losses["fp8"]))
    assert abs(losses["fp8"].mean() - losses["bf16"].mean()) < 0.1 * losses["bf16"].mean()
    net = load_hypernetwork(files["fp8"])
    assert net.step == 6
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    # it loads into an fp32 model as before and changes the image
    model = models.load_model(data_paths, "tiny-demo")
    settings = PreviewSettings(prompt="a cat", seed=1, steps=2, width=64, height=64)
    (off, _), (on, _) = (render_with(model, net, s, settings) for s in (0.0, 1.0))
    assert not np.allclose(np.asarray(off), np.asarray(on))


@pytest.mark.parametrize("method", ["xti", "apt"])
def test_xti_and_apt_share_the_fp8_path(data_paths, photo_dataset, monkeypatch, method):
    from trainers.configs import AptConfig, XtiConfig
    from trainers.registry import runner
    seen = _seen_by_the_loop(monkeypatch)
    common = dict(model="tiny-demo", data_root=str(photo_dataset), width=64, height=64, steps=2,
                  save_every=0, preview_every=0, template="subject_filewords.txt",
                  learn_rate="0.005", mixed_precision="bf16", fp8_base=True)
    if method == "xti":
        cfg = XtiConfig(output_name="px", **common).validate()
    else:
        make_embedding(data_paths, name="apttok")
        cfg = AptConfig(embedding="apttok", create_missing=True, **common).validate()
    ctx = RecordingContext(data_paths)
    runner(method)(cfg, ctx)
    assert seen["weights"] == {FP8}
    assert len(ctx.losses) == 2 and np.all(np.isfinite(ctx.losses))


@pytest.mark.parametrize("config", ["TextualInversionConfig", "HypernetworkTrainingConfig",
                                    "XtiConfig", "AptConfig"])
def test_fp8_base_without_mixed_precision_is_refused_by_name(config):
    from trainers import configs
    names = dict(embedding="x", hypernetwork="x", output_name="x")
    fields = {f for f in getattr(configs, config).__dataclass_fields__}
    with pytest.raises(ConfigError, match=r"fp8_base: needs mixed precision bf16 or fp16"):
        getattr(configs, config)(model="tiny-demo", data_root="d", fp8_base=True,
                                 **{k: v for k, v in names.items() if k in fields}).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a CUDA GPU")
def test_fp16_without_a_gpu_is_refused_with_the_lora_wording(data_paths, photo_dataset):
    from trainers.methods.textual_inversion import run
    make_embedding(data_paths)
    with pytest.raises(ConfigError, match=r"mixed_precision: fp16 needs a CUDA GPU; choose bf16 "
                                          r"\(works on CPUs\) or no"):
        run(ti_config(photo_dataset, mixed_precision="fp16", fp8_base=True),
            RecordingContext(data_paths))


def test_the_estimate_counts_one_byte_per_fp8_weight():
    from trainers.configs import TextualInversionConfig
    from trainers.memory_estimate import estimate
    weights = {name: estimate(TextualInversionConfig(model="x", mixed_precision="bf16",
                                                     fp8_base=fp8), "sdxl").parts["weights"]
               for name, fp8 in (("bf16", False), ("fp8", True))}
    unet = 2.567e9
    assert weights["bf16"] - weights["fp8"] == pytest.approx(unet, rel=0.01)
