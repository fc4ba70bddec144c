"""Stable Diffusion 2.x: a U-Net on OpenCLIP ViT-H (1024-wide context); 768-v models predict v,
base 512 models the noise (the scheduler config says which)."""
from trainers.families import Demo, Family, register
from trainers.families.sd1 import SCHEDULER as SD1_SCHEDULER, sd_index

# the demo: SD 2.x 768-v, the same betas, v-prediction (stabilityai/stable-diffusion-2-1: DDIM)
SCHEDULER = {**SD1_SCHEDULER, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}

FAMILY = register(Family(
    name="sd2", label="SD 2.x", context_width=1024, pipeline="StableDiffusionPipeline",
    text_activation="gelu", text_key_prefix="cond_stage_model.model.",
    tokenizer_pads=("!",),  # OpenCLIP pads with "!" (id 0), SD1's CLIP with the end token
    token_embedding_keys=("cond_stage_model.model.token_embedding.weight",),
    checkpoint_layout="sd2", kohya_flags={"v2": True}, v_resolution=768,
    params=(865.9e6, 340.4e6, 83.7e6), hypernetwork_sizes=(1024, 320, 640, 1280),
    demo=Demo("tiny-demo-sd2", "built-in SD 2.x v-prediction demo, random weights",
              "trainers.tiny_model:build_sd2_components", SCHEDULER, sd_index("DDIMScheduler"),
              params=(0.80e6, 2.41e6, 0.26e6), hypernetwork_sizes=(48, 32, 64))))
