"""Qwen-Image (Qwen/Qwen-Image): a 20B flow-matching transformer of 60 dual-stream blocks
(3072 wide, 24 heads of 128) on Qwen2.5-VL-7B's last hidden states, with a 3-D (video-shaped)
VAE of 16 channels whose latents are normalised per channel and patched 2x2 into tokens
(trainers/qwenimage_model.py)."""
from trainers.families import Demo, Family, Memory, register

# Qwen/Qwen-Image's scheduler
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
    "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192, "max_shift": 0.9,
    "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential",
    "use_beta_sigmas": False, "use_dynamic_shifting": True, "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
INDEX = {
    "_class_name": "QwenImagePipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def _is_qwenimage_folder(index: dict, unet: dict) -> bool:
    return index.get("_class_name") == "QwenImagePipeline" \
        or (index.get("transformer") or [None, None])[1] == "QwenImageTransformer2DModel"


FAMILY = register(Family(
    name="qwen_image", label="Qwen-Image", context_width=3584, pipeline="QwenImagePipeline",
    folder_marker=_is_qwenimage_folder, prediction="flow", single_file=False,
    unet_key_markers=("txt_norm.weight",),  # only its transformer has it
    transformer_file="trainers.qwenimage_model:FILE_LAYOUT",
    tokenizer_pads=(None,), tokenizer_kinds=("trainers.qwenimage_model:write_demo_tokenizer",),
    safety_checker=False, shipped_sampler="FlowMatchEuler", resolution=1328,
    # the transformer, Qwen2.5-VL-7B (text and vision) and the VAE at their published shapes
    # (tests/test_qwenimage.py builds them on the meta device)
    params=(20.43e9, 8.29e9, 126.9e6),
    # measured per block at the published width: python3 -m bench.flow_memory --families qwen_image
    memory=Memory(lora_per_rank=(6.636e6, 0), activations_256=(5.812e10, 0),
                  checkpointed_256=1.173e9),
    prompt_encoder="trainers.qwenimage_model:qwenimage_prompt_encoder",
    preview_pipeline="trainers.qwenimage_model:qwenimage_pipeline",
    predict="trainers.qwenimage_model:qwenimage_prediction", denoiser="transformer",
    training_vae="trainers.qwenimage_model:qwenimage_vae",
    lora_layout="trainers.qwenimage_lora:QWENIMAGE_LAYOUT",
    lora_metadata="trainers.qwenimage_lora:metadata",
    demo=Demo("tiny-demo-qwenimage", "built-in Qwen-Image demo, random weights",
              "trainers.qwenimage_model:build_qwenimage_components", SCHEDULER, INDEX,
              params=(0.05e6, 0.09e6, 0.67e6), hypernetwork_sizes=(),
              parts=("transformer", "vae", "text_encoder"))))
