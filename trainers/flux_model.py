"""Flux.1's hooks (trainers/families/flux.py): captions to conditioning, one transformer
prediction on latents, and the preview pipeline around the live modules.

Conditioning is what FluxPipeline computes: T5's last hidden states padded to
`max_sequence_length` (512 for dev, as kohya's t5xxl_max_token_length) and CLIP-L's pooled
output. A prediction packs the [B, C, H, W] latents into 2x2 patches ([B, H/2 * W/2, 4C]) with
(0, row, column) position ids, all-zero text ids, the sigma as the timestep (the transformer
scales it by 1000) and the guidance value for a guidance-distilled model, and unpacks the
output to the latents' shape."""
from __future__ import annotations

import torch

from trainers.conditioning import PooledCondition

T5_TOKENS = 512


class FluxCondition(PooledCondition):
    """[batch, T5 tokens, T5 width] context; CLIP-L's pooled output."""

    def pipeline_embeds(self) -> dict:
        """The first row as FluxPipeline's prompt embedding arguments."""
        return {"prompt_embeds": self.context[:1], "pooled_prompt_embeds": self.pooled[:1]}


class FluxPromptEncoder:
    def __init__(self, model, max_sequence_length: int = T5_TOKENS):
        self.model = model
        self.max_sequence_length = max_sequence_length

    @property
    def text_encoder(self):
        return self.model.text_encoder

    def encode(self, texts: list[str]) -> FluxCondition:
        model = self.model
        clip = model.tokenizer(texts, padding="max_length", truncation=True,
                               max_length=model.tokenizer.model_max_length, return_tensors="pt")
        pooled = model.text_encoder(clip.input_ids.to(model.text_encoder.device),
                                    output_hidden_states=False).pooler_output
        t5 = model.tokenizer_2(texts, padding="max_length", truncation=True,
                               max_length=self.max_sequence_length, return_tensors="pt")
        context = model.text_encoder_2(t5.input_ids.to(model.text_encoder_2.device),
                                       output_hidden_states=False)[0]
        return FluxCondition(context=context, pooled=pooled.to(context.dtype))


def flux_prompt_encoder(model, embeddings, clip_skip, max_tokens, chunking) -> FluxPromptEncoder:
    if embeddings:
        raise ValueError("Flux.1: textual-inversion embeddings are not supported for this family")
    return FluxPromptEncoder(model)


def pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(0, row, column) per packed token, as FluxPipeline numbers them."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_prediction(transformer, noisy: torch.Tensor, timesteps: torch.Tensor, context,
                    added_cond: dict | None, dtype: torch.dtype) -> torch.Tensor:
    from trainers.step import Guided
    if isinstance(context, Guided):
        raise ValueError("Flux.1: guidance in the loss (DreamArtist) is not supported")
    height, width = noisy.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"Flux.1: latents of {height}x{width} do not divide into 2x2 patches "
                         "(the image size must be a multiple of 16)")
    added = dict(added_cond or {})
    guidance = added.pop("guidance", None)
    if not transformer.config.guidance_embeds:
        guidance = None
    out = transformer(
        hidden_states=pack(noisy.to(dtype)), encoder_hidden_states=context.to(dtype),
        pooled_projections=added["pooled_projections"].to(dtype),
        timestep=(timesteps / 1000).to(dtype),
        guidance=None if guidance is None else guidance.to(dtype),
        img_ids=image_ids(height, width, noisy.device, dtype),
        txt_ids=torch.zeros(context.shape[1], 3, device=noisy.device, dtype=dtype),
        return_dict=False)[0]
    return unpack(out, height, width)


def flux_pipeline(model, transformer, scheduler):
    """FluxPipeline around the live transformer; it always samples with its own flow-matching
    Euler scheduler (the SD samplers do not apply)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
        transformer=transformer)
