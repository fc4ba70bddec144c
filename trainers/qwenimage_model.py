"""Qwen-Image's hooks (trainers/families/qwenimage.py): captions to conditioning, one transformer
prediction on latents, the training view of its VAE, the preview pipeline around the live
modules, and the tiny demo's modules and tokenizer.

Conditioning is what QwenImagePipeline.encode_prompt computes: each caption put in its fixed
template (a system turn asking to describe the image, the caption as the user turn, the
assistant prompt), Qwen2.5-VL's last hidden states, and the template's first 34 tokens (the
system turn and "<|im_start|>user\\n") dropped. The pipeline pads to the batch's longest caption;
Danlu pads every caption to 34 + `max_sequence_length` tokens (the text model is causal, so a
token's state does not depend on what follows it) and keeps the attention mask in the
condition's `pooled` slot, so captions batch and memoize like every other family's.

Latents: the VAE is a 3-D (video) one: it takes [B, 3, frames, H, W] and gives 16 channels per
8x8 pixels and frame; the pipeline works on one frame and normalises each channel by the VAE's
`latents_mean` / `latents_std`. Danlu's flow-matching objective noises the latents it is given,
so `QwenImageLatents` is the VAE as Danlu's data code reads it: [B, 3, H, W] in, the normalised
[B, 16, H / 8, W / 8] distribution out (scaling factor 1, no shift), and back.

A prediction packs the latents into 2x2 patches as the pipeline's `_pack_latents` (64 channels
per token, row-major), gives `img_shapes` (1 frame, h / 2, w / 2), sigma as the timestep (the
transformer scales it by 1000), the caption states trimmed to the batch's longest caption with
their mask (none when every caption fills it, as encode_prompt does), and unpacks the output.
The pipeline's Euler step is latents + (sigma_next - sigma) * output, so the output is the
velocity noise - x that Danlu trains."""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from trainers.conditioning import PooledCondition

# QwenImagePipeline's prompt_template_encode and prompt_template_encode_start_idx
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, "
            "texture, quantity, text, spatial relationships of the objects and background:"
            "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
DROP = 34
TOKENS = 512  # its default max_sequence_length
TOKENIZER_VOCAB = 700  # the demo's learnt tokens; then 5 special ones (qwen_tokenizer_files)
QWEN_VOCAB = 712  # the demo text model's table: the tokenizer's 705 and 4 unused vision ids


def _pipeline_class():
    from diffusers import QwenImagePipeline
    return QwenImagePipeline


class QwenImageLatentDistribution:
    """A diagonal Gaussian in the transformer's latent space (what `latent_dist` gives)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise


class QwenImageLatents(nn.Module):
    """Qwen-Image's VAE as the transformer sees it: one frame, each channel normalised by the
    VAE's latents_mean / latents_std, as QwenImagePipeline does before its transformer (its
    img2img `_encode_vae_image`) and undoes before decoding. The wrapped VAE is `vae`."""

    def __init__(self, vae):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict
        self.vae = vae
        # Danlu's data code reads the latent grid's factor from block_out_channels
        # (2 ** (len - 1)); this VAE's is 2 ** len(temperal_downsample).
        levels = len(vae.config.temperal_downsample) + 1
        self.config = FrozenDict({**vae.config, "scaling_factor": 1.0, "shift_factor": 0.0,
                                  "block_out_channels": (vae.config.base_dim,) * levels,
                                  "latent_channels": vae.config.z_dim})

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def encode(self, pixels: torch.Tensor, return_dict: bool = True):
        from diffusers.models.modeling_outputs import AutoencoderKLOutput
        dist = self.vae.encode(pixels.unsqueeze(2)).latent_dist
        mean, std = dist.mean.squeeze(2), dist.std.squeeze(2)
        shift, scale = self._stats(mean)
        out = QwenImageLatentDistribution((mean - shift) / scale, std / scale)
        return AutoencoderKLOutput(latent_dist=out) if return_dict else (out,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput
        shift, scale = self._stats(latents)
        raw = (latents * scale + shift).unsqueeze(2)
        image = self.vae.decode(raw, return_dict=False)[0][:, :, 0]
        return DecoderOutput(sample=image) if return_dict else (image,)


def qwenimage_vae(vae) -> QwenImageLatents:
    """The model's VAE as Danlu's data code and objective must see it (see QwenImageLatents)."""
    return vae if isinstance(vae, QwenImageLatents) else QwenImageLatents(vae)


class QwenImageCondition(PooledCondition):
    """[batch, tokens, text width] states after the template's first 34 tokens, padded;
    `pooled` is the [batch, tokens] attention mask (1 for a caption's own tokens), not a
    pooled text vector."""

    @property
    def mask(self) -> torch.Tensor:
        return self.pooled > 0.5

    def trimmed(self) -> list[torch.Tensor]:
        """Each caption's states without its padding (encode_prompt's rows before it pads)."""
        return [row[keep] for row, keep in zip(self.context, self.mask)]

    def pipeline_embeds(self) -> dict:
        """The prompt (and, encoded with it, the negative prompt) as QwenImagePipeline's
        arguments, each at its own length with an all-ones mask."""
        embeds = {}
        for name, row in zip(("prompt", "negative_prompt"), self.trimmed()):
            embeds[f"{name}_embeds"] = row[None]
            embeds[f"{name}_embeds_mask"] = torch.ones(1, len(row), dtype=torch.long,
                                                       device=row.device)
        return embeds


class QwenImagePromptEncoder:
    def __init__(self, model, max_sequence_length: int = TOKENS):
        self.model = model
        self.max_sequence_length = max_sequence_length

    @property
    def text_encoder(self):
        return self.model.text_encoder

    def encode(self, texts: list[str]) -> QwenImageCondition:
        tokenizer, encoder = self.model.tokenizer, self.model.text_encoder
        tokens = tokenizer([TEMPLATE.format(text) for text in texts], padding="max_length",
                           max_length=DROP + self.max_sequence_length, truncation=True,
                           return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device)
        # the VL model's text part: the same hidden states without the vocabulary logits
        body = getattr(encoder, "model", encoder)
        states = body(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask,
                      output_hidden_states=True, use_cache=False).hidden_states[-1]
        return QwenImageCondition(context=states[:, DROP:],
                                  pooled=mask[:, DROP:].to(states.dtype))


def qwenimage_prompt_encoder(model, embeddings, clip_skip, max_tokens,
                             chunking) -> QwenImagePromptEncoder:
    if embeddings:
        raise ValueError("Qwen-Image: textual-inversion embeddings are not supported for this "
                         "family")
    return QwenImagePromptEncoder(model)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, h/2 * w/2, 4C], as QwenImagePipeline._pack_latents."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2),
                                                      channels * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of height x width."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, features // 4, height, width)


def qwenimage_prediction(transformer, noisy: torch.Tensor, timesteps: torch.Tensor, context,
                         added_cond: dict | None, dtype: torch.dtype) -> torch.Tensor:
    """The velocity noise - x for normalised latents noised to sigma = timesteps / 1000."""
    from trainers.step import Guided
    if isinstance(context, Guided):
        raise ValueError("Qwen-Image: guidance in the loss (DreamArtist) is not supported")
    batch, channels, height, width = noisy.shape
    if height % 2 or width % 2:
        raise ValueError(f"Qwen-Image: latents of {height}x{width} do not divide into 2x2 "
                         "patches (the image size must be a multiple of 16)")
    expected = transformer.config.in_channels // 4
    if channels != expected:
        raise ValueError(f"Qwen-Image: latents of {channels} channels; the transformer takes "
                         f"{expected} (the VAE's, normalised: "
                         "trainers.qwenimage_model.QwenImageLatents)")
    mask = (added_cond or {}).get("pooled_projections")
    if mask is None:
        raise ValueError("Qwen-Image: the conditioning carries no caption mask "
                         "(encode captions with the Qwen-Image prompt encoder)")
    keep = mask > 0.5
    longest = int(keep.sum(dim=1).max())
    keep = keep[:, :longest]
    out = transformer(hidden_states=pack(noisy.to(dtype)),
                      encoder_hidden_states=context[:, :longest].to(dtype),
                      encoder_hidden_states_mask=None if bool(keep.all()) else keep,
                      timestep=(timesteps / 1000).to(dtype),
                      img_shapes=[[(1, height // 2, width // 2)]] * batch,
                      return_dict=False)[0]
    return unpack(out, height, width)


def qwenimage_pipeline(model, transformer, scheduler):
    """QwenImagePipeline around the live transformer and the real VAE; it always samples with
    its own flow-matching Euler scheduler (the SD samplers do not apply), and the sample's CFG
    scale is its `true_cfg_scale` (with the negative prompt; 1 turns it off)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    vae = model.vae.vae if isinstance(model.vae, QwenImageLatents) else model.vae
    return _preview_class()(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
        vae=vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        transformer=transformer)


@functools.cache
def _preview_class():
    class QwenImagePreviewPipeline(_pipeline_class()):
        """QwenImagePipeline taking Danlu's preview CFG scale as its true_cfg_scale (its own
        `guidance_scale` is for guidance-distilled models, which Qwen-Image is not)."""

        def __call__(self, *args, guidance_scale: float | None = None, **kwargs):
            kwargs.setdefault("true_cfg_scale", 1.0 if guidance_scale is None else guidance_scale)
            return super().__call__(*args, **kwargs)
    return QwenImagePreviewPipeline


class QwenImageFileLayout:
    """Qwen-Image's single transformer files (ComfyUI's `qwen_image_bf16.safetensors`, the DiT
    musubi-tuner trains) name every tensor as diffusers does, optionally under ComfyUI's
    `model.diffusion_model.` (Family.transformer_file; trainers/transformer_file.py)."""
    label = "Qwen-Image"

    def to_diffusers(self, state: dict) -> dict:
        from trainers.formats.transformer_layouts import PREFIX, TransformerLayoutError
        state = {key.removeprefix(PREFIX): tensor for key, tensor in state.items()}
        if "txt_norm.weight" not in state:
            raise TransformerLayoutError("not a Qwen-Image transformer: no txt_norm.weight")
        return state

    def to_original(self, state: dict) -> dict:
        return dict(state)


FILE_LAYOUT = QwenImageFileLayout()


def write_demo_tokenizer(folder: Path) -> Path:
    """The demo's Qwen tokenizer (Qwen2.5-VL's is Qwen2's), learnt with the pipeline's template
    so the template's first 34 tokens are its system turn and user prompt, as with the real
    tokenizer."""
    from trainers.qwen_tokenizer_files import write_qwen_tokenizer
    words = TEMPLATE.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("{}", "")
    return write_qwen_tokenizer(folder, vocab_size=TOKENIZER_VOCAB, extra_text=words)


def build_qwenimage_components(seed: int = 0, width: int = 32, text_width: int = 32):
    """Qwen-Image's shape: (transformer, vae, text_encoder Qwen2.5-VL-like). One dual-stream
    block, `width` wide in heads of 16 (real: 3072, 60 blocks, 24 heads of 128), 64 packed
    input channels and 16 out as the real one; the 3-D VAE with 16 latent channels and the
    real latents_mean / latents_std, 8x spatial compression, 8 wide (real: 96); a two-layer
    Qwen2.5-VL text model `text_width` wide (real: Qwen2.5-VL-7B, 28 layers, 3584) with a
    one-block vision tower the pipeline never runs."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16,
        num_attention_heads=width // 16, joint_attention_dim=text_width, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    special = TOKENIZER_VOCAB  # <|endoftext|>, <|im_start|>, <|im_end|>, <think>, </think>
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=QWEN_VOCAB, hidden_size=text_width, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=1024, bos_token_id=special, eos_token_id=special + 2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                             "rope_theta": 1000000.0}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=text_width, fullatt_block_indexes=[0]),
        image_token_id=QWEN_VOCAB - 4, video_token_id=QWEN_VOCAB - 3,
        vision_start_token_id=QWEN_VOCAB - 2, vision_end_token_id=QWEN_VOCAB - 1))
    return transformer, vae, text_encoder
