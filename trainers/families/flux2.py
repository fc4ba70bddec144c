"""Flux.2 Klein (black-forest-labs FLUX.2-klein-4B / -9B and their -base models): a flow-matching
transformer of double- and single-stream blocks (4B: 5 + 20, 3072 wide) on three stacked hidden
layers of Qwen3 (4B: Qwen3-4B, 9B: Qwen3-8B), no guidance embedding; Flux.2's 32-channel VAE,
whose latents are patched 2x2 into 128 channels and batch-norm normalised before the
transformer (trainers/flux2_model.py)."""
from trainers.families import Demo, Family, Memory, register

# black-forest-labs/FLUX.2-klein-4B's scheduler
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256,
    "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}
INDEX = {
    "_class_name": "Flux2KleinPipeline", "is_distilled": False,
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
    "transformer": ["diffusers", "Flux2Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLFlux2"],
}


def _is_flux2_folder(index: dict, unet: dict) -> bool:
    return index.get("_class_name") == "Flux2KleinPipeline" \
        or (index.get("transformer") or [None, None])[1] == "Flux2Transformer2DModel"


FAMILY = register(Family(
    name="flux2_klein", label="Flux.2 Klein", context_width=7680, pipeline="Flux2KleinPipeline",
    folder_marker=_is_flux2_folder, prediction="flow", single_file=False,
    unet_key_markers=("single_stream_modulation.lin.weight",),
    transformer_file="trainers.formats.transformer_layouts:FLUX2",
    tokenizer_pads=(None,), tokenizer_kinds=("qwen",),
    safety_checker=False, shipped_sampler="FlowMatchEuler", resolution=1024,
    # Klein 4B's transformer (tests/test_flux2.py builds it on the meta device), Qwen3-4B,
    # Flux.2's VAE
    params=(3.88e9, 4.02e9, 84.0e6),
    # measured per block at the published width: python3 -m bench.flow_memory --families flux2_klein
    memory=Memory(lora_per_rank=(1.505e6, 0), activations_256=(1.960e10, 0),
                  checkpointed_256=1.445e9, context_tokens=512),
    prompt_encoder="trainers.flux2_model:flux2_prompt_encoder",
    preview_pipeline="trainers.flux2_model:flux2_pipeline",
    predict="trainers.flux2_model:flux2_prediction", denoiser="transformer",
    training_vae="trainers.flux2_model:flux2_vae",
    lora_layout="trainers.flux2_lora:FLUX2_LAYOUT", lora_metadata="trainers.flux2_lora:metadata",
    demo=Demo("tiny-demo-flux2", "built-in Flux.2 Klein demo, random weights",
              "trainers.flux2_model:build_flux2_components", SCHEDULER, INDEX,
              params=(0.06e6, 0.03e6, 0.27e6), hypernetwork_sizes=(),
              parts=("transformer", "vae", "text_encoder"))))
