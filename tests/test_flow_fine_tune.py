"""DreamBooth and fine-tuning of the flow families' whole transformer on their tiny demos: what
trains and what stays, the transformer-only file in the family's original layout (its keys back
through the layout equal the trained transformer; Danlu loads it as a model giving the same
prediction), the diffusers folder (the family's pipeline class loads it), exact resume, class
images from the family's pipeline, the memory options, Compare, and what is refused by name."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core.config import ConfigError
from tests.conftest import RecordingContext, photo, repeat_with_interruption
from tests.test_textual_inversion import module_digest
from trainers import families
from trainers.configs import DreamBoothConfig, FineTuneConfig
from trainers.methods import dreambooth, fine_tune
from trainers.models import load_model

DEMOS = {"zimage": "tiny-demo-zimage", "chroma": "tiny-demo-chroma",
         "flux2_klein": "tiny-demo-flux2", "flux1": "tiny-demo-flux",
         "qwen_image": "tiny-demo-qwenimage"}


def db_config(folder, family="chroma", **changes):
    base = dict(model=DEMOS[family], output_name="flowdb", train_data_dir=str(folder),
                resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
                max_train_steps=3, save_every_n_epochs=0, learning_rate=1e-3, seed=3,
                sample_at_first=False, save_precision="fp32")
    base.update(changes)
    return DreamBoothConfig(**base).validate()


def prediction_loss(model, seed=0) -> float:
    """The family's own step (predict hook, objective, prompt encoder) at fixed noise."""
    from trainers.conditioning import prompt_encoder, unet_inputs
    from trainers.step import diffusion_loss
    scale = model.vae_scale
    latents = torch.randn(1, model.vae.config.latent_channels, 64 // scale, 64 // scale,
                          generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        context, added = unet_inputs(prompt_encoder(model).encode(["zxq cat"]), latents,
                                     vae_scale=scale)
        return diffusion_loss(model.unet, model.objective(), latents, context,
                              torch.Generator().manual_seed(seed + 1), added_cond=added,
                              predict=model.spec.hook("predict")).item()


def state_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].float(), b[k].float()) for k in a)


@pytest.mark.parametrize("family", list(DEMOS))
def test_dreambooth_trains_the_transformer_only_and_its_files_load(family_paths, pictures,
                                                                   family):
    spec = families.get(family)
    base = load_model(family_paths, DEMOS[family])
    frozen = {"vae": module_digest(getattr(base.vae, "vae", base.vae)),
              **{f"text_encoder{i or ''}": module_digest(m)
                 for i, m in enumerate(base.text_encoders)}}
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    base_loss = prediction_loss(base)
    ctx = RecordingContext(family_paths)
    path = dreambooth.run(db_config(pictures, family, save_diffusers=True), ctx)
    assert path == family_paths.stable_diffusion / "flowdb.safetensors"
    assert len(ctx.losses) == 3 and all(math.isfinite(loss) for loss in ctx.losses)

    # the file: the original layout's keys (no prefix), danlu metadata, nothing but the transformer
    layout = spec.hook("transformer_file")
    saved = load_file(path)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["danlu.steps"] == "3" and meta["danlu.method"] == "dreambooth"
    assert meta["danlu.base_model"] == DEMOS[family] and meta["danlu.save_id"]
    assert families.detect_family(saved) == family
    assert set(saved) == set(layout.to_original(before))
    trained = layout.to_diffusers(saved)

    # the diffusers folder: the family's pipeline class; its transformer is the trained one,
    # its VAE and text encoders the base model's
    folder = family_paths.stable_diffusion / "flowdb"
    pipe = spec.pipeline_class().from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == spec.pipeline
    assert state_equal(pipe.transformer.state_dict(), trained)
    assert not state_equal(trained, before)
    assert module_digest(pipe.vae) == frozen["vae"]
    assert module_digest(pipe.text_encoder) == frozen["text_encoder"]

    # Danlu loads the file back as a model of the family: same transformer, same prediction
    tuned = load_model(family_paths, "flowdb.safetensors")
    assert tuned.family == family
    assert state_equal(tuned.unet.state_dict(), trained)
    assert {f"text_encoder{i or ''}": module_digest(m)
            for i, m in enumerate(tuned.text_encoders)} == \
        {k: v for k, v in frozen.items() if k != "vae"}
    tuned_loss = prediction_loss(tuned)
    assert tuned_loss != base_loss
    from_folder = load_model(family_paths, "flowdb")
    assert prediction_loss(from_folder) == tuned_loss
    # training left the base model as it was
    assert state_equal(load_model(family_paths, DEMOS[family]).unet.state_dict(), before)


def _sidecar(path):
    from trainers.formats.safe_load import safe_torch_load
    return safe_torch_load(path.with_name(path.name + ".optim"))


def test_an_interrupted_flow_dreambooth_resumes_exactly(family_paths, pictures):
    """Saved in bf16 with the EMA weights, so the resumed run starts from the sidecar's fp32
    transformer and EMA (only what trained: the base model gives the frozen text encoder and
    VAE)."""
    from core.events import Status
    cfg = db_config(pictures, "zimage", max_train_steps=5, save_precision="bf16",
                    lr_scheduler="cosine", use_ema=True, ema_decay=0.5)

    def reset():
        for leftover in family_paths.stable_diffusion.iterdir():
            leftover.unlink()

    def after_first(path):
        assert set(_sidecar(path)["danlu"]["weights"]) == {"unet"}
    _, _, second = repeat_with_interruption(dreambooth.run, cfg, family_paths, load=load_file,
                                            reset=reset, after_first=after_first)
    assert any("exact fp32 weights of step 2" in e.text for e in second.of(Status))


def test_fine_tune_trains_a_flow_transformer_with_the_memory_options(family_paths, tmp_path):
    """full_bf16 (stochastic rounding), the fused backward pass with Adafactor, gradient
    checkpointing and cached text encoder outputs, from a metadata JSON."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        photo(i).save(images / f"img{i}.png")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({f"img{i}": {"caption": f"qzx painting {i}"} for i in range(2)}))
    base = load_model(family_paths, DEMOS["flux2_klein"])
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    cfg = FineTuneConfig(
        model=DEMOS["flux2_klein"], output_name="flowft", train_data_dir=str(images),
        in_json=str(meta), resolution=64, min_bucket_reso=32, max_bucket_reso=128,
        bucket_reso_steps=16, max_train_steps=2, learning_rate=1e-3, seed=5,
        sample_at_first=False, save_precision="bf16", mixed_precision="bf16", full_bf16=True,
        fused_backward_pass=True, optimizer_type="Adafactor", max_grad_norm=0.0,
        gradient_checkpointing=True, cache_text_encoder_outputs=True,
        timestep_sampling="sigmoid").validate()
    ctx = RecordingContext(family_paths)
    path = fine_tune.run(cfg, ctx)
    assert len(ctx.losses) == 2 and all(math.isfinite(loss) for loss in ctx.losses)
    saved = load_file(path)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    trained = families.get("flux2_klein").hook("transformer_file").to_diffusers(saved)
    assert not state_equal(trained, before)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["danlu.method"] == "fine_tune"


def test_class_images_come_from_the_family_pipeline(family_paths, pictures, tmp_path):
    from trainers.class_images import ensure_class_images
    class_dir = tmp_path / "class"
    ctx = RecordingContext(family_paths)
    model = load_model(family_paths, DEMOS["chroma"])
    assert ensure_class_images(model, class_dir, "a photo of a cat", 2, 64, 1, "Euler a", ctx,
                               steps=2) == 2
    assert (class_dir / "class-00001.txt").read_text() == "a photo of a cat"
    # prior preservation with them (none is missing, so none is generated)
    dreambooth.run(db_config(pictures, "chroma", max_train_steps=1, class_data_dir=str(class_dir),
                             class_prompt="a photo of a cat", num_class_images=2), ctx)
    assert sorted(p.name for p in class_dir.glob("*.png")) == ["class-00000.png",
                                                              "class-00001.png"]


def test_run_history_use_this_checkpoint_compare_and_continuing(family_paths, pictures):
    """A periodic copy is listed with its step, *Use this checkpoint* puts it where Danlu loads
    it, Compare loads it as a whole model, and a second run of the same name continues the file."""
    from types import SimpleNamespace

    from core.events import Status
    from trainers import checkpoint_use, runs
    from trainers.checkpoint_apply import whole_model
    cfg = db_config(pictures, "zimage", max_train_steps=2, save_every_n_steps=1)
    path = dreambooth.run(cfg, RecordingContext(family_paths))
    [run] = runs.scan_runs(family_paths)
    assert run.method == "dreambooth"
    first = next(c for c in run.checkpoints if c.step == 1)
    copied = checkpoint_use.use_checkpoint(family_paths, run, first, "picked")
    assert copied == family_paths.stable_diffusion / "picked.safetensors"
    assert load_model(family_paths, "picked.safetensors").family == "zimage"
    with whole_model(SimpleNamespace(clip_skip=1), family_paths, None, path, []) as (own, _, enc):
        assert own.family == "zimage" and own.name == str(path)
        assert enc.encode(["zxq cat"]) is not None
    ctx = RecordingContext(family_paths)
    dreambooth.run(db_config(pictures, "zimage", max_train_steps=3), ctx)
    assert any("Resuming at step 2" in e.text for e in ctx.of(Status)) and len(ctx.losses) == 1
    # saved in fp32, the file itself is loaded to continue; it still names its base model
    assert any("Loading model flowdb.safetensors" in e.text for e in ctx.of(Status))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["danlu.steps"] == "3"
        assert handle.metadata()["danlu.base_model"] == DEMOS["zimage"]


def test_extract_lora_refuses_a_flow_model_by_name(family_paths):
    from trainers.configs import ExtractLoraConfig
    from trainers.extract_lora import run as extract
    cfg = ExtractLoraConfig(checkpoint="flowdb.safetensors", model=DEMOS["chroma"],
                            output_name="fromflow").validate()
    from trainers.preflight import check_before_queueing
    words = "model: tiny-demo-chroma is a Chroma model; Extract LoRA trains SD 1.x"
    with pytest.raises(ConfigError, match=words):
        check_before_queueing(cfg, family_paths)
    with pytest.raises(families.FamilyError, match=words):
        extract(cfg, RecordingContext(family_paths))


@pytest.mark.parametrize("changes, words", [
    ({"train_text_encoder": True},
     "train_text_encoder: Chroma full fine-tuning trains the transformer only"),
    ({"min_snr_gamma": 5.0}, "min_snr_gamma: does not apply to flow-matching models"),
    ({"v_parameterization": True}, "v_parameterization: applies to the noise schedules of SD"),
    ({"debiased_estimation_loss": True}, "debiased_estimation_loss: applies to the noise"),
    ({"resolution": 72}, "resolution: Chroma needs a multiple of 16"),
    ({"mixed_precision": "fp16"}, "mixed_precision: Chroma is a bf16 model"),
    ({"mixed_precision": "fp16", "full_fp16": True}, "full_fp16: Chroma is a bf16 model"),
])
def test_what_does_not_apply_to_a_flow_model_is_refused_by_name(family_paths, pictures,
                                                                changes, words):
    from trainers.preflight import check_before_queueing
    cfg = db_config(pictures, "chroma", **changes)
    with pytest.raises(ConfigError, match=words):
        check_before_queueing(cfg, family_paths)
    if "mixed_precision" not in changes:  # fp16 is refused on a CPU by the run's path check
        with pytest.raises(ConfigError, match=words):  # the run itself (CLI, any file) too
            dreambooth.run(cfg, RecordingContext(family_paths))


def test_flow_options_are_refused_on_an_sd_model_and_the_defaults_pass(family_paths, pictures):
    from trainers.preflight import check_before_queueing
    with pytest.raises(ConfigError, match="timestep_sampling: applies to flow-matching models "
                                          "only; SD 1.x is trained with noise prediction"):
        check_before_queueing(db_config(pictures, model="tiny-demo",
                                        timestep_sampling="sigmoid"), family_paths)
    check_before_queueing(db_config(pictures, "qwen_image"), family_paths)
    cfg = FineTuneConfig(model=DEMOS["zimage"], output_name="x", train_data_dir="d",
                         in_json="m.json", train_text_encoder=True).validate()
    with pytest.raises(ConfigError, match="Z-Image full fine-tuning trains the transformer"):
        check_before_queueing(cfg, family_paths)
