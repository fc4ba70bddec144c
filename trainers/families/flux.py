"""Flux.1 (dev, schnell) and Chroma-style flow-matching transformers: a 19 double- and 38
single-stream block transformer on T5-XXL states, with CLIP-L's pooled vector and (dev) a
guidance embedding; 16-channel latents packed 2x2 into tokens."""
from trainers.families import Demo, Family, Memory, register

# black-forest-labs/FLUX.1-dev's scheduler
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
    "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
INDEX = {
    "_class_name": "FluxPipeline", "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _is_flux_folder(index: dict, unet: dict) -> bool:
    return index.get("_class_name") == "FluxPipeline" \
        or (index.get("transformer") or [None, None])[1] == "FluxTransformer2DModel"


FAMILY = register(Family(
    name="flux1", label="Flux.1", context_width=4096, pipeline="FluxPipeline",
    folder_marker=_is_flux_folder, prediction="flow", single_file=False,
    unet_key_markers=("vector_in.in_layer.weight",),
    transformer_file="trainers.formats.transformer_layouts:FLUX",
    tokenizer_pads=(None, None), tokenizer_kinds=("clip", "t5"),
    safety_checker=False, shipped_sampler="FlowMatchEuler", resolution=1024,
    params=(11.9e9, 4.88e9, 83.8e6),
    # measured per block at the published width: python3 -m bench.flow_memory --families flux1
    memory=Memory(lora_per_rank=(5.370e6, 1.659e5), activations_256=(4.555e10, 4.561e8),
                  checkpointed_256=1.672e9, context_tokens=512),
    prompt_encoder="trainers.flux_model:flux_prompt_encoder",
    preview_pipeline="trainers.flux_model:flux_pipeline",
    predict="trainers.flux_model:flux_prediction", denoiser="transformer",
    lora_layout="trainers.flux_lora:FLUX_LAYOUT", lora_metadata="trainers.flux_lora:metadata",
    demo=Demo("tiny-demo-flux", "built-in Flux.1 demo, random weights",
              "trainers.tiny_model:build_flux_components", SCHEDULER, INDEX,
              params=(0.12e6, 1.9e6, 0.27e6), hypernetwork_sizes=(),
              parts=("transformer", "vae", "text_encoder", "text_encoder_2"))))
