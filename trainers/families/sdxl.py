"""SDXL (base and refiner): a U-Net on two text encoders (CLIP ViT-L and OpenCLIP bigG, 2048-wide
context side by side) with size / crop conditioning (`text_time`)."""
from trainers.families import Demo, Family, Memory, register
from trainers.families.sd1 import MB

# the demo's scheduler (stabilityai/stable-diffusion-xl-base-1.0's Euler, epsilon)
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "interpolation_type": "linear", "steps_offset": 1, "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
INDEX = {"force_zeros_for_empty_prompt": True, "image_encoder": [None, None],
         "scheduler": ["diffusers", "EulerDiscreteScheduler"],
         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
         "tokenizer_2": ["transformers", "CLIPTokenizer"]}


def _is_sdxl_folder(index: dict, unet: dict) -> bool:
    return "XL" in str(index.get("_class_name", "")) \
        or ("text_encoder_2" in index and "unet" in index) \
        or unet.get("addition_embed_type") == "text_time"


FAMILY = register(Family(
    name="sdxl", label="SDXL", context_width=2048, pipeline="StableDiffusionXLPipeline",
    text_key_prefix="conditioner.embedders.",
    unet_key_markers=("model.diffusion_model.label_emb.",), folder_marker=_is_sdxl_folder,
    tokenizer_pads=(None, "!"),
    token_embedding_keys=(
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.token_embedding.weight"),
    embedding_halves=("clip_l", "clip_g"), safety_checker=False, shipped_sampler="Euler",
    checkpoint_layout="sdxl", kohya_flags={"sdxl": True},
    resolution=1024, params=(2567.5e6, 817.8e6, 83.7e6), hypernetwork_sizes=(2048, 640, 1280),
    # the U-Net measured whole at its published shape (python3 -m bench.flow_memory --families
    # sdxl); the text encoders' part is still SD 1.x's (CLIP-L's alone)
    memory=Memory(lora_per_rank=(2.660e6, 165888), activations_256=(8.510e9, 435 * MB),
                  checkpointed_256=1.678e8),
    prompt_encoder="trainers.conditioning:sdxl_prompt_encoder",
    preview_pipeline="trainers.sampling:sdxl_pipeline",
    demo=Demo("tiny-demo-sdxl", "built-in SDXL demo, random weights",
              "trainers.tiny_model:build_sdxl_components", SCHEDULER, INDEX,
              params=(1.38e6, 4.02e6, 0.26e6), hypernetwork_sizes=(80, 64))))
