"""DreamBooth end to end on the tiny model: what changes, prior preservation, the single file,
class images, and extracting a LoRA from the result."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config import ConfigError
from core.events import Status
from tests.conftest import RecordingContext, photo, repeat_with_interruption
from tests.test_textual_inversion import module_digest
from trainers import models
from trainers.class_images import ensure_class_images
from trainers.configs import DreamBoothConfig, ExtractLoraConfig
from trainers.methods.dreambooth import _datasets, run
from trainers.models import load_model


@pytest.fixture
def instance_dir(tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    for i in range(2):
        photo(i).save(folder / f"{i}.png")
    return folder


def db_config(folder, **changes):
    base = dict(model="tiny-demo", output_name="mydb", train_data_dir=str(folder), resolution=64,
                min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                instance_prompt="a photo of zxq dog", max_train_steps=3, learning_rate=1e-3,
                sample_at_first=False, save_precision="fp32", seed=3)
    base.update(changes)
    return DreamBoothConfig(**base).validate()


def image_of(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of zxq dog", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def test_unet_changes_vae_does_not_and_the_single_file_reproduces_it(data_paths, instance_dir):
    from diffusers import StableDiffusionPipeline
    base = load_model(data_paths, "tiny-demo")
    digests = {n: module_digest(getattr(base, n)) for n in ("unet", "vae", "text_encoder")}
    path = run(db_config(instance_dir), RecordingContext(data_paths))
    assert path == data_paths.stable_diffusion / "mydb.safetensors"
    tuned = load_model(data_paths, "mydb.safetensors")  # loads offline with the demo's config
    assert module_digest(tuned.unet) != digests["unet"]
    assert module_digest(tuned.vae) == digests["vae"]
    assert module_digest(tuned.text_encoder) == digests["text_encoder"]
    fresh = load_model(data_paths, "tiny-demo")  # the cache was not altered by training
    assert module_digest(fresh.unet) == digests["unet"]
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(data_paths.cache / "tiny-demo"),
                                                    local_files_only=True, safety_checker=None)
    trained = StableDiffusionPipeline(vae=tuned.vae, text_encoder=tuned.text_encoder,
                                      tokenizer=tuned.tokenizer, unet=tuned.unet,
                                      scheduler=pipe.scheduler, safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False)
    assert np.allclose(image_of(pipe), image_of(trained), atol=1e-5)
    base_pipe = StableDiffusionPipeline.from_pretrained(data_paths.cache / "tiny-demo", safety_checker=None)
    assert not np.allclose(image_of(pipe), image_of(base_pipe), atol=1e-4)


@pytest.mark.parametrize("changes", [{"save_precision": "fp16"},
                                     {"save_precision": "bf16", "use_ema": True, "ema_decay": 0.5,
                                      "train_text_encoder": True}])
def test_interrupted_then_resumed_run_repeats_the_uninterrupted_one_when_saving_rounded(
        data_paths, instance_dir, changes):
    from safetensors.torch import load_file
    cfg = db_config(instance_dir, max_train_steps=5, **changes)
    def load(path):
        weights = load_file(path)
        assert weights["model.diffusion_model.out.2.weight"].dtype != torch.float32  # rounded
        return weights

    def reset():
        for leftover in data_paths.stable_diffusion.iterdir():
            leftover.unlink()
    _, _, second = repeat_with_interruption(run, cfg, data_paths, load=load, reset=reset)
    assert any("exact fp32 weights of step 2" in e.text for e in second.of(Status))


def _sidecar(path):
    from trainers.formats.safe_load import safe_torch_load
    return safe_torch_load(path.with_name(path.name + ".optim"))


@pytest.mark.parametrize("te, kept", [(False, {"unet"}), (True, {"unet", "text_encoder"})])
def test_the_sidecar_keeps_the_fp32_weights_of_only_what_trained(data_paths, instance_dir, te, kept):
    """Not the frozen VAE or text encoder (resume reads those from the base model)."""
    path = run(db_config(instance_dir, max_train_steps=1, save_precision="fp16",
                         train_text_encoder=te), RecordingContext(data_paths))
    weights = _sidecar(path)["danlu"]["weights"]
    assert set(weights) == kept
    base = load_model(data_paths, "tiny-demo")
    assert set(weights["unet"]) == set(base.unet.state_dict())
    assert all(t.dtype == torch.float32 for t in weights["unet"].values())


def test_a_sidecar_with_every_module_as_older_versions_wrote_still_resumes_exactly(
        data_paths, instance_dir):
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    from transformers import CLIPTextModel
    from trainers.formats.safe_load import save_torch_legacy
    cfg = db_config(instance_dir, max_train_steps=4, save_precision="fp16")
    demo = data_paths.cache / "tiny-demo"
    frozen = {"text_encoder": CLIPTextModel.from_pretrained(demo / "text_encoder").state_dict(),
              "vae": AutoencoderKL.from_pretrained(demo / "vae").state_dict()}

    def as_older_versions_wrote(path):
        payload = _sidecar(path)
        payload["danlu"]["weights"].update(frozen)
        save_torch_legacy(payload, path.with_name(path.name + ".optim"))

    def reset():
        for leftover in data_paths.stable_diffusion.iterdir():
            leftover.unlink()
    _, _, second = repeat_with_interruption(run, cfg, data_paths, load=load_file, reset=reset,
                                            after_first=as_older_versions_wrote)
    assert any("exact fp32 weights of step 2" in e.text for e in second.of(Status))
    assert any("Loading model mydb.safetensors" in e.text for e in second.of(Status))


def test_text_encoder_trains_when_asked(data_paths, instance_dir):
    base = load_model(data_paths, "tiny-demo")
    before = module_digest(base.text_encoder)
    run(db_config(instance_dir, train_text_encoder=True, text_encoder_lr=1e-3), RecordingContext(data_paths))
    assert module_digest(load_model(data_paths, "mydb.safetensors").text_encoder) != before


def test_class_images_are_generated_only_when_missing(data_paths, tmp_path):
    model = load_model(data_paths, "tiny-demo")
    folder = tmp_path / "class"
    ctx = RecordingContext(data_paths)
    assert ensure_class_images(model, folder, "a photo of a dog", 3, 64, 1, "Euler a", ctx, steps=2) == 3
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert len(stamps) == 3 and (folder / "class-00000.txt").read_text() == "a photo of a dog"
    assert ensure_class_images(model, folder, "a photo of a dog", 3, 64, 1, "Euler a", ctx, steps=2) == 0
    assert ensure_class_images(model, folder, "a photo of a dog", 4, 64, 1, "Euler a", ctx, steps=2) == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p.name in stamps} == stamps


def test_prior_preservation_batches_mix_instance_and_class_images_with_the_weight(data_paths, instance_dir, tmp_path):
    from trainers.kohya_data import prepare_datasets
    model = load_model(data_paths, "tiny-demo")
    class_dir = tmp_path / "class"
    ensure_class_images(model, class_dir, "a photo of a dog", 2, 64, 1, "Euler a",
                        RecordingContext(data_paths), steps=2)
    cfg = db_config(instance_dir, class_data_dir=str(class_dir), class_prompt="a photo of a dog",
                    num_class_images=2, prior_loss_weight=0.25, train_batch_size=4)
    batches = prepare_datasets(_datasets(cfg, data_paths, class_dir), model.vae, prior_loss_weight=0.25)
    batch = batches.batch(0)
    assert sorted(batch.texts) == ["a photo of a dog"] * 2 + ["a photo of zxq dog"] * 2
    weights = batch.weights.flatten().tolist()
    assert sorted(weights) == [0.25, 0.25, 1.0, 1.0]
    for text, weight in zip(batch.texts, weights):
        assert (weight == 0.25) == (text == "a photo of a dog")


def test_weighted_loss_combines_instance_and_prior_terms(data_paths):
    from trainers.step import diffusion_loss
    model = load_model(data_paths, "tiny-demo")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    each = [diffusion_loss(model.unet, model.objective(), latents[i:i + 1], context[i:i + 1],
                           _gen(i)).item() for i in range(2)]
    # with a fixed generator the pair draws the same noise as drawing both at once
    both = diffusion_loss(model.unet, model.objective(), latents, context, torch.Generator().manual_seed(5),
                          weight=torch.tensor([1.0, 0.5]).view(2, 1, 1, 1))
    plain = diffusion_loss(model.unet, model.objective(), latents, context, torch.Generator().manual_seed(5))
    assert both.item() < plain.item()
    assert len(each) == 2


def _gen(i):
    return torch.Generator().manual_seed(10 + i)


def test_extracted_lora_loads_and_moves_toward_the_fine_tuned_output(data_paths, instance_dir):
    from diffusers import StableDiffusionPipeline
    from trainers.extract_lora import run as extract
    run(db_config(instance_dir, max_train_steps=4, learning_rate=3e-3), RecordingContext(data_paths))
    path = extract(ExtractLoraConfig(checkpoint="mydb.safetensors", model="tiny-demo",
                                     output_name="fromdb", rank=64, conv_rank=64,
                                     save_precision="fp32").validate(),
                   RecordingContext(data_paths))
    base = StableDiffusionPipeline.from_pretrained(data_paths.cache / "tiny-demo", safety_checker=None)
    tuned = StableDiffusionPipeline.from_single_file(str(data_paths.stable_diffusion / "mydb.safetensors"),
                                                     config=str(data_paths.cache / "tiny-demo"),
                                                     local_files_only=True, safety_checker=None)
    base_image, tuned_image = image_of(base), image_of(tuned)
    base.load_lora_weights(str(path))
    with_lora = image_of(base)
    assert np.abs(with_lora - tuned_image).mean() < 0.5 * np.abs(base_image - tuned_image).mean()
    with pytest.raises(FileExistsError):
        extract(ExtractLoraConfig(checkpoint="mydb.safetensors", model="tiny-demo",
                                  output_name="fromdb").validate(), RecordingContext(data_paths))


@pytest.mark.parametrize("changes, words", [
    ({"num_class_images": 5}, "class_data_dir"),
    ({"num_class_images": 5, "class_data_dir": "x"}, "class_prompt"),
    ({"output_name": "a/b"}, "output_name"),
])
def test_bad_settings_are_named(instance_dir, changes, words):
    with pytest.raises(ConfigError, match=words):
        db_config(instance_dir, **changes)
