"""Stable Diffusion 1.x: a U-Net on OpenAI's CLIP ViT-L/14 text encoder (768-wide context),
predicting the noise."""
from trainers.families import Demo, Family, Memory, register

# the demo's scheduler (runwayml/stable-diffusion-v1-5's PNDM)
SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon",
    "clip_sample": False,
}


def sd_index(scheduler: str) -> dict:
    """model_index.json entries of a StableDiffusionPipeline folder beyond the shared ones."""
    return {"safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", scheduler]}


MB = 2 ** 20

FAMILY = register(Family(
    name="sd1", label="SD 1.x", context_width=768, pipeline="StableDiffusionPipeline",
    text_activation="quick_gelu", text_key_prefix="cond_stage_model.transformer.",
    token_embedding_keys=("cond_stage_model.transformer.text_model.embeddings."
                          "token_embedding.weight",),
    checkpoint_layout="sd1", params=(859.5e6, 123.1e6, 83.7e6),
    hypernetwork_sizes=(768, 320, 640, 1280),
    # measured on the SD1.5-shaped model (bench.fixtures) and the demo, LoRA r16 (BENCHMARKS.md)
    memory=Memory(lora_per_rank=(423936, 165888), activations_256=(1341 * MB, 435 * MB)),
    demo=Demo("tiny-demo", "built-in SD 1.x demo, random weights",
              "trainers.tiny_model:build_components", SCHEDULER, sd_index("PNDMScheduler"),
              params=(0.79e6, 1.6e6, 0.26e6), hypernetwork_sizes=(32, 64),
              memory=Memory(lora_per_rank=(5376, 896),
                            activations_256=(22.1 * MB, 0.5 * MB)))))
