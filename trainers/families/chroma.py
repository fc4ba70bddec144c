"""Chroma (lodestones/Chroma, Chroma1-HD): Flux.1-schnell's 19 double- and 38 single-stream
blocks, 3072 wide, on T5-XXL states only (no CLIP, no guidance embedding), the per-block
modulation layers replaced by one small "distilled guidance" approximator; Flux's 16-channel
VAE, latents packed 2x2 into tokens."""
from trainers.families import Demo, Family, Memory, register
from trainers.families.flux import SCHEDULER

INDEX = {
    "_class_name": "ChromaPipeline", "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "ChromaTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _is_chroma_folder(index: dict, unet: dict) -> bool:
    return index.get("_class_name") == "ChromaPipeline" \
        or (index.get("transformer") or [None, None])[1] == "ChromaTransformer2DModel"


FAMILY = register(Family(
    name="chroma", label="Chroma", context_width=4096, pipeline="ChromaPipeline",
    folder_marker=_is_chroma_folder, prediction="flow", single_file=False,
    unet_key_markers=("distilled_guidance_layer.in_proj.weight",),
    transformer_file="trainers.formats.transformer_layouts:FLUX",
    tokenizer_pads=(None,), tokenizer_kinds=("t5",),
    safety_checker=False, shipped_sampler="FlowMatchEuler", resolution=1024,
    # Chroma1-HD's transformer (tests/test_chroma.py builds it on the meta device), T5-XXL's
    # encoder, Flux's VAE
    params=(8.9e9, 4.76e9, 83.8e6),
    # measured per block at the published width: python3 -m bench.flow_memory --families chroma
    memory=Memory(lora_per_rank=(4.086e6, 0), activations_256=(3.767e10, 0),
                  checkpointed_256=1.167e9),
    prompt_encoder="trainers.chroma_model:chroma_prompt_encoder",
    preview_pipeline="trainers.chroma_model:chroma_pipeline",
    predict="trainers.chroma_model:chroma_prediction", denoiser="transformer",
    lora_layout="trainers.chroma_lora:CHROMA_LAYOUT", lora_metadata="trainers.chroma_lora:metadata",
    demo=Demo("tiny-demo-chroma", "built-in Chroma demo, random weights",
              "trainers.chroma_model:build_chroma_components", SCHEDULER, INDEX,
              params=(0.05e6, 0.08e6, 0.27e6), hypernetwork_sizes=(),
              parts=("transformer", "vae", "text_encoder"))))
