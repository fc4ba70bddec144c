"""The built-in demo models: SD1-, SD2- (v-prediction) and SDXL-shaped pipelines with tiny random
weights and the real CLIP vocabulary, built locally in about a second so every tab works with no
download. Each is saved as a complete diffusers folder in the real layout of its family."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from trainers import families

# the app's default model when models/ has none: the SD1 demo (trainers/families/sd1.py); each
# family module declares its demo (families.demo_families lists them)
DEMO_NAME = "tiny-demo"
# The training size (px) the Train tab's forms take when a demo model is chosen: its images are
# noise whatever the size, and a first run at 512 px took minutes (BENCHMARKS.md, "First run").
DEMO_TRAINING_SIZE = 64


def demo_size(name: str | None) -> int | None:
    """The training size for model `name` if it is a demo model, else None."""
    return DEMO_TRAINING_SIZE if families.demo_of(name) is not None else None


# SDXL's size/crop conditioning: 6 numbers, each embedded in this many channels (real: 256)
SDXL_TIME_EMBED_DIM = 8


def _vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def _clip_config(width: int, activation: str, projection: int | None = None):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        projection_dim=projection or width, hidden_act=activation)


def build_components(seed: int = 0, cross_attention_dim: int = 32):
    """SD1 shape: return (unet, vae, text_encoder) with deterministic random weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8)
    vae = _vae()
    text_encoder = CLIPTextModel(_clip_config(cross_attention_dim, "quick_gelu"))
    return unet, vae, text_encoder


def build_sd2_components(seed: int = 0, cross_attention_dim: int = 48):
    """SD2 shape (OpenCLIP-style gelu text encoder, linear proj_in/proj_out, per-block head
    counts); the context is 48 wide so it differs from the SD1 demo's 32."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4),
        use_linear_projection=True)
    vae = _vae()
    text_encoder = CLIPTextModel(_clip_config(cross_attention_dim, "gelu"))
    return unet, vae, text_encoder


def build_sdxl_components(seed: int = 0, width_1: int = 32, width_2: int = 48):
    """SDXL shape: (unet, vae, text_encoder, text_encoder_2). The context is both encoders'
    penultimate states side by side (32 + 48 = 80 here, 768 + 1280 = 2048 in SDXL); the U-Net's
    `text_time` embedding takes the second encoder's pooled projection and 6 size/crop numbers.
    The two widths differ, as in SDXL, which diffusers' single-file loader relies on."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
        cross_attention_dim=width_1 + width_2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + width_2)
    vae = _vae()
    text_encoder = CLIPTextModel(_clip_config(width_1, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(width_2, "gelu", width_2))
    return unet, vae, text_encoder, text_encoder_2


def _flux_vae():
    """Flux's VAE shape: 16 latent channels, no quant convs, a shift before the scale."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159)


def build_flux_components(seed: int = 0, width: int = 32, t5_width: int = 48):
    """Flux.1-dev shape: (transformer, vae, text_encoder CLIP-L-like, text_encoder_2 T5-like).
    One double- and one single-stream block, `width` wide (real: 3072), a guidance embedding;
    the T5 context is `t5_width` wide (real: 4096) and CLIP's pooled vector `width` (768)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=width // 16, joint_attention_dim=t5_width,
        pooled_projection_dim=width, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = _flux_vae()
    text_encoder = CLIPTextModel(_clip_config(width, "quick_gelu"))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=T5_VOCAB, d_model=t5_width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return transformer, vae, text_encoder, text_encoder_2


T5_VOCAB = 1000  # the demo's T5 tokenizer (trainers/tokenizer_files.write_t5_tokenizer)


def _model_index(family: families.Family) -> dict:
    common = {"_diffusers_version": "0.42.1", "feature_extractor": [None, None],
              "text_encoder": ["transformers", "CLIPTextModel"],
              "tokenizer": ["transformers", "CLIPTokenizer"],
              "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"]}
    if "unet" not in family.demo.parts:  # not SD-shaped: its index lists every component
        return {"_class_name": family.pipeline, "_diffusers_version": "0.42.1",
                **family.demo.index}
    return {"_class_name": family.pipeline, **common, **family.demo.index}


def write_tokenizers(folder: Path, family: families.Family) -> None:
    """The family's tokenizer folders (tokenizer, tokenizer_2, ...): CLIP ones with its pad
    tokens, T5 ones (`tokenizer_kinds`) with the demo's small vocabulary; a kind written as
    "module:function" is that function's folder."""
    from trainers.tokenizer_files import write_clip_tokenizer, write_t5_tokenizer
    for i, pad in enumerate(family.tokenizer_pads):
        target = folder / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}")
        kinds = family.tokenizer_kinds
        if i < len(kinds) and ":" in kinds[i]:
            families.resolve(kinds[i])(target)
        elif i < len(kinds) and kinds[i] == "t5":
            write_t5_tokenizer(target, vocab_size=T5_VOCAB)
        elif i < len(kinds) and kinds[i] == "qwen":
            from trainers.qwen_tokenizer_files import write_qwen_tokenizer
            write_qwen_tokenizer(target)
        else:
            write_clip_tokenizer(target, pad_token=pad)


def build_tiny_model(folder: Path, seed: int = 0, family: str = "sd1") -> Path:
    """Write a complete diffusers folder (model_index.json, weights, tokenizers, scheduler) of
    the given family ('sd1', 'sd2' v-prediction, 'sdxl'); an existing one is kept."""
    spec = families.get(family) if family in families.names() else None
    if spec is None or spec.demo is None:
        known = ", ".join(f.name for f in families.all_families() if f.demo is not None)
        raise ValueError(f"family {family!r}: choose one of {known}")
    folder = Path(folder)
    if (folder / "model_index.json").exists():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent if folder.parent.exists() else None))
    try:
        parts = families.resolve(spec.demo.builder)(seed)
        for name, part in zip(spec.demo.parts, parts):
            part.save_pretrained(staging / name)
        write_tokenizers(staging, spec)
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(spec.demo.scheduler))
        (staging / "model_index.json").write_text(json.dumps(_model_index(spec), indent=1))
        (staging / "DEMO_MODEL.txt").write_text(
            f"Danlu's built-in {spec.label}-shaped demo model: random weights, for trying the "
            "app on a CPU. Its images are noise; put a real model in models/Stable-diffusion.\n")
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.exists():
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
