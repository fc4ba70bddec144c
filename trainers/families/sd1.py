"""Stable Diffusion 1.x: a U-Net on OpenAI's CLIP ViT-L/14 text encoder (768-wide context),
predicting the noise."""
from trainers.families import Family, register

FAMILY = register(Family(
    name="sd1", label="SD 1.x", context_width=768, pipeline="StableDiffusionPipeline",
    text_activation="quick_gelu", text_key_prefix="cond_stage_model.transformer."))
