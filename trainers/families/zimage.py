"""Z-Image (Tongyi-MAI Z-Image-Turbo / Z-Image): a single-stream flow-matching transformer
(S3-DiT, 30 layers 3840 wide, with noise and caption refiners) on Qwen3-4B's hidden states,
Flux's 16-channel VAE; latents patched 2x2 into tokens."""
from trainers.families import Demo, Family, Memory, register

# Tongyi-MAI/Z-Image-Turbo's scheduler
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
    "shift": 3.0, "use_dynamic_shifting": False,
}
INDEX = {
    "_class_name": "ZImagePipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _is_zimage_folder(index: dict, unet: dict) -> bool:
    return index.get("_class_name") == "ZImagePipeline" \
        or (index.get("transformer") or [None, None])[1] == "ZImageTransformer2DModel"


FAMILY = register(Family(
    name="zimage", label="Z-Image", context_width=2560, pipeline="ZImagePipeline",
    folder_marker=_is_zimage_folder, prediction="flow", single_file=False,
    unet_key_markers=("layers.0.adaLN_modulation.0.weight",),
    transformer_file="trainers.formats.transformer_layouts:ZIMAGE",
    tokenizer_pads=(None,), tokenizer_kinds=("qwen",),
    safety_checker=False, shipped_sampler="FlowMatchEuler", resolution=1024,
    params=(6.15e9, 4.02e9, 83.8e6),
    # measured per block at the published width: python3 -m bench.flow_memory --families zimage
    memory=Memory(lora_per_rank=(2.189e6, 0), activations_256=(2.421e10, 0),
                  checkpointed_256=9.560e8),
    prompt_encoder="trainers.zimage_model:zimage_prompt_encoder",
    preview_pipeline="trainers.zimage_model:zimage_pipeline",
    predict="trainers.zimage_model:zimage_prediction", denoiser="transformer",
    lora_layout="trainers.zimage_lora:ZIMAGE_LAYOUT", lora_metadata="trainers.zimage_lora:metadata",
    demo=Demo("tiny-demo-zimage", "built-in Z-Image demo, random weights",
              "trainers.zimage_model:build_zimage_components", SCHEDULER, INDEX,
              params=(0.35e6, 0.04e6, 0.27e6), hypernetwork_sizes=(),
              parts=("transformer", "vae", "text_encoder"))))
