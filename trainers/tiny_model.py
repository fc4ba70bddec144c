"""The built-in demo model: an SD1-shaped pipeline with tiny random weights and the real CLIP
vocabulary, built locally in about a second so every tab works with no download."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

DEMO_NAME = "tiny-demo"

SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "prediction_type": "epsilon",
    "clip_sample": False,
}


def build_components(seed: int = 0, cross_attention_dim: int = 32):
    """Return (unet, vae, text_encoder) with deterministic random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=cross_attention_dim, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32,
        hidden_act="quick_gelu"))
    return unet, vae, text_encoder


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a complete diffusers folder (model_index.json, weights, tokenizer, scheduler)."""
    from trainers.tokenizer_files import write_clip_tokenizer

    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent if folder.parent.exists() else None))
    try:
        unet, vae, text_encoder = build_components(seed)
        unet.save_pretrained(staging / "unet")
        vae.save_pretrained(staging / "vae")
        text_encoder.save_pretrained(staging / "text_encoder")
        write_clip_tokenizer(staging / "tokenizer")
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
        (staging / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None], "safety_checker": [None, None],
            "requires_safety_checker": False,
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}, indent=1))
        (staging / "DEMO_MODEL.txt").write_text(
            "Danlu's built-in demo model: random weights, for trying the app on a CPU. "
            "Its images are noise; put a real model in models/Stable-diffusion.\n")
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.exists():
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
