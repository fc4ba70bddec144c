"""Extract LoRA's SVD (exact or randomized), its per-layer error, and reading the fine-tuned
checkpoint one weight at a time (trainers/extract_lora.py, trainers/checkpoint_weights.py).
The extraction end to end (files that load in diffusers and move the output toward the
fine-tune) is tested in test_dreambooth.py, test_sd2.py, test_sdxl.py and test_file_bytes.py."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import RecordingContext
from trainers import extract_lora as ex


def _optimum(diff: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the least relative Frobenius error of any rank-`rank` matrix."""
    s = torch.linalg.svdvals(diff.double())
    return float((s[rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())


def _randomized(shape, rank) -> bool:
    calls = []
    original = torch.svd_lowrank

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    torch.svd_lowrank = spy
    try:
        ex.low_rank(torch.randn(*shape), rank)
    finally:
        torch.svd_lowrank = original
    return bool(calls)


def test_randomized_only_where_the_rank_is_small_against_the_layer():
    assert _randomized((320, 2880), 32)  # an SD 1.5 ResNet conv, flattened
    assert not _randomized((320, 320), 128)  # rank close to the size: exact
    assert not _randomized((64, 288), 4)  # small layers: exact (milliseconds)


@pytest.mark.parametrize("shape", [(300, 400), (40, 50)])  # randomized, exact
def test_a_low_rank_difference_is_recovered(shape):
    g = torch.Generator().manual_seed(0)
    diff = torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g)
    up, down = ex.low_rank(diff, 8)
    assert up.shape == (shape[0], 8) and down.shape == (8, shape[1])
    assert ex.relative_error(diff, up, down) < 1e-5


def test_on_a_full_rank_difference_the_randomized_svd_is_near_the_optimum():
    diff = torch.randn(300, 400, generator=torch.Generator().manual_seed(1))
    assert _randomized(diff.shape, 16)
    up, down = ex.low_rank(diff, 16)
    error, best = ex.relative_error(diff, up, down), _optimum(diff, 16)
    assert best - 1e-6 <= error <= best * 1.02  # a flat spectrum is its worst case


def test_the_randomized_svd_is_seeded_and_leaves_the_global_generator_alone():
    diff = torch.randn(300, 400, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = ex.low_rank(diff, 16)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    second = ex.low_rank(diff, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_summary_names_the_mean_and_the_worst_layer():
    extracted = ex.Extracted({}, {"lora_unet_a": 0.1, "lora_unet_b": 0.3})
    assert extracted.summary() == ("relative Frobenius error left per layer: mean 0.2000, "
                                   "worst 0.3000 (lora_unet_b)")


@pytest.mark.parametrize("demo", ["tiny-demo", "tiny-demo-sd2", "tiny-demo-sdxl"])
def test_weights_read_from_a_single_file_are_the_models_own(family_paths, demo):
    """Every module LoRA (and LoCon) targets, read by name from the file Danlu writes for the
    model, is that module's weight (SDXL's and SD 2.x's OpenCLIP encoders fuse q/k/v)."""
    from trainers.checkpoint_weights import open_checkpoint
    from trainers.families import file_family
    from trainers.formats.sd_checkpoint import save_single_file
    from trainers.lora_network import find_targets
    from trainers.models import load_model
    model = load_model(family_paths, demo)
    path = family_paths.stable_diffusion / f"{demo}.safetensors"
    save_single_file(path, model.unet, model.vae, model.text_encoder, dtype=torch.float32,
                     family=model.family, text_encoder_2=model.text_encoder_2)
    assert file_family(path) == model.family
    reader = open_checkpoint(path, model.family, model.unet.config)
    parts = {"unet": model.unet, "text_encoder": model.text_encoder,
             "text_encoder_2": model.text_encoder_2}
    checked = 0
    for part, module in parts.items():
        if module is None:
            continue
        for target in find_targets(module, part, conv=part == "unet"):
            weight = module.get_submodule(target.path).weight
            assert torch.equal(reader.weight(part, target.path, weight.shape), weight), target.path
            checked += 1
    assert checked > 20


def test_the_checkpoint_is_read_lazily_not_loaded(data_paths, monkeypatch):
    """Only the base model is loaded; the fine-tuned file is read a layer at a time, and the
    message gives the error left per layer."""
    from trainers.configs import ExtractLoraConfig
    from trainers.formats.sd_checkpoint import save_single_file
    from trainers.models import load_model
    model = load_model(data_paths, "tiny-demo")
    tuned = {name: w.detach().clone() for name, w in model.unet.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.unet.parameters():
            if weight.dim() > 1:
                weight.add_(0.01 * torch.randn(weight.shape, generator=g))
        save_single_file(data_paths.stable_diffusion / "moved.safetensors", model.unet, model.vae,
                         model.text_encoder, dtype=torch.float32)
        model.unet.load_state_dict(tuned)  # the cached model is the base again
    loaded = []
    real = ex.load_model
    monkeypatch.setattr(ex, "load_model", lambda paths, name, **kw: loaded.append(name)
                        or real(paths, name, **kw))
    ctx = RecordingContext(data_paths)
    ex.run(ExtractLoraConfig(checkpoint="moved.safetensors", model="tiny-demo", output_name="moved",
                             rank=4).validate(), ctx)
    assert loaded == ["tiny-demo"]
    message = ctx.events[-1].message
    assert "relative Frobenius error left per layer: mean 0." in message
    assert "worst 0." in message and "(lora_unet_" in message


def test_a_checkpoint_of_another_family_is_refused_by_name_before_anything_is_read(family_paths):
    from trainers.configs import ExtractLoraConfig
    from trainers.formats.sd_checkpoint import save_single_file
    from trainers.models import load_model
    sd2 = load_model(family_paths, "tiny-demo-sd2")
    save_single_file(family_paths.stable_diffusion / "other.safetensors", sd2.unet, sd2.vae,
                     sd2.text_encoder, family="sd2")
    with pytest.raises(ValueError, match=r"checkpoint: other.safetensors is .*but tiny-demo is"):
        ex.run(ExtractLoraConfig(checkpoint="other.safetensors", model="tiny-demo",
                                 output_name="x").validate(), RecordingContext(family_paths))
