"""Preview images from the live (training) modules with a fixed seed."""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

SAMPLER_CLASSES = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
}


@dataclass
class PreviewSettings:
    prompt: str
    negative: str = ""
    seed: int = 42
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "Euler a"
    width: int = 512
    height: int = 512


def make_sampler(name: str, scheduler_config: dict):
    import diffusers
    if name not in SAMPLER_CLASSES:
        raise ValueError(f"preview_sampler: unknown sampler {name!r}")
    class_name, extra = SAMPLER_CLASSES[name]
    return getattr(diffusers, class_name).from_config(scheduler_config, **extra)


def _pipeline(model, unet, scheduler):
    """The family's diffusers pipeline around the live modules (its `preview_pipeline`)."""
    return model.spec.hook("preview_pipeline")(model, unet, scheduler)


def sd_pipeline(model, unet, scheduler):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def sdxl_pipeline(model, unet, scheduler):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline(
        vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=unet,
        scheduler=scheduler)


def _embeds(encoder, settings: PreviewSettings) -> dict:
    """Prompt and negative prompt as the pipeline's *_embeds arguments (SDXL: + pooled),
    encoded as one batch so a long prompt and a short negative get as many chunks."""
    from trainers.conditioning import SdxlCondition
    both = encoder.encode([settings.prompt, settings.negative])
    if hasattr(both, "pipeline_embeds"):  # a family whose pipeline takes its own arguments
        return both.pipeline_embeds()
    if isinstance(both, SdxlCondition):
        return {"prompt_embeds": both.context[:1], "negative_prompt_embeds": both.context[1:],
                "pooled_prompt_embeds": both.pooled[:1],
                "negative_pooled_prompt_embeds": both.pooled[1:]}
    return {"prompt_embeds": both[:1], "negative_prompt_embeds": both[1:]}


def render(model, encoder, settings: PreviewSettings, unet=None):
    """Render one image; `encoder` is the prompt encoder holding the embeddings being trained
    (a PromptEncoder, or an SdxlPromptEncoder for SDXL)."""
    unet = unet or model.unet
    pipe = _pipeline(model, unet, make_sampler(settings.sampler, model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    seed = settings.seed if settings.seed >= 0 else random.randrange(2**32)
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            image = pipe(**_embeds(encoder, settings),
                         num_inference_steps=settings.steps, guidance_scale=settings.cfg,
                         width=settings.width, height=settings.height,
                         generator=torch.Generator().manual_seed(seed)).images[0]
    finally:
        unet.train(was_training)
    return image, seed
