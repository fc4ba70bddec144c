"""Flux.2 Klein's hooks (trainers/families/flux2.py): captions to conditioning, one transformer
prediction on latents, the training view of its VAE, the preview pipeline around the live
modules, and the tiny demo's modules.

Conditioning is what Flux2KleinPipeline computes: each caption wrapped in Qwen3's chat template
(a user turn and the assistant prompt, thinking disabled), padded to `max_sequence_length`
tokens, and the hidden states after layers 9, 18 and 27 laid side by side per token
([batch, 512, 3 x text width]). The pipeline gives the transformer every padded token with no
attention mask, so the states stay padded and are a plain tensor, as SD's are.

Latents: Flux.2's VAE gives 32 channels per 8x8 pixels; the pipeline patches them 2x2 into
128 channels per 16x16 pixels and normalises each channel by the VAE's batch-norm running
statistics before the transformer sees them, and draws its noise in that space. Danlu's
flow-matching objective noises the latents it is given, so they must be that normalised
128-channel tensor: `Flux2Latents` is the VAE as Danlu's data code reads it (encode gives the
normalised patched distribution, decode takes it back; scaling factor 1, no shift, a factor of
16 per latent pixel).

A prediction packs the [B, 128, h, w] latents into h*w tokens (row-major, the pipeline's
`_pack_latents`) with 4-axis position ids (0, row, column, 0), text ids (0, 0, 0, token),
sigma as the timestep (the transformer scales it by 1000) and no guidance embedding (Klein has
none; the base models use true CFG at sampling). The pipeline's Euler step is
latents + (sigma_next - sigma) * output, so the output is the velocity noise - x that Danlu
trains."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

TOKENS = 512  # Flux2KleinPipeline's default max_sequence_length
LAYERS = (9, 18, 27)  # its text_encoder_out_layers
QWEN_VOCAB = 608  # the demo's tokenizer has 605 tokens (trainers/qwen_tokenizer_files.py)


def _pipeline_class():
    from diffusers import Flux2KleinPipeline
    return Flux2KleinPipeline


class Flux2LatentDistribution:
    """A diagonal Gaussian in the transformer's latent space (what `latent_dist` gives)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise


class Flux2Latents(nn.Module):
    """Flux.2's VAE as the transformer sees it: latents patched 2x2 (128 channels, 16 px per
    latent) and normalised by the VAE's batch-norm statistics, as Flux2KleinPipeline does
    before its transformer and undoes before decoding. The wrapped VAE is `vae`."""

    def __init__(self, vae):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict
        self.vae = vae
        blocks = tuple(vae.config.block_out_channels)
        # Danlu's data code reads the latent grid's factor from block_out_channels
        # (2 ** (len - 1)); the 2x2 patching doubles the VAE's 8.
        self.config = FrozenDict({**vae.config, "scaling_factor": 1.0, "shift_factor": 0.0,
                                  "block_out_channels": (*blocks, blocks[-1]),
                                  "latent_channels": 4 * vae.config.latent_channels})

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps)
        return mean, std.to(like.device, like.dtype)

    def encode(self, pixels: torch.Tensor, return_dict: bool = True):
        from diffusers.models.modeling_outputs import AutoencoderKLOutput
        patchify = _pipeline_class()._patchify_latents
        dist = self.vae.encode(pixels).latent_dist
        mean = patchify(dist.mean)
        shift, scale = self._stats(mean)
        out = Flux2LatentDistribution((mean - shift) / scale, patchify(dist.std) / scale)
        return AutoencoderKLOutput(latent_dist=out) if return_dict else (out,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        shift, scale = self._stats(latents)
        raw = _pipeline_class()._unpatchify_latents(latents * scale + shift)
        return self.vae.decode(raw, return_dict=return_dict)


def flux2_vae(vae) -> Flux2Latents:
    """The model's VAE as Danlu's data code and objective must see it (see Flux2Latents)."""
    return vae if isinstance(vae, Flux2Latents) else Flux2Latents(vae)


class Flux2PromptEncoder:
    def __init__(self, model, max_sequence_length: int = TOKENS, layers=LAYERS):
        self.model = model
        self.max_sequence_length = max_sequence_length
        self.layers = tuple(layers)

    @property
    def text_encoder(self):
        return self.model.text_encoder

    def encode(self, texts: list[str]) -> torch.Tensor:
        tokenizer, encoder = self.model.tokenizer, self.model.text_encoder
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=False) for text in texts]
        tokens = tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                           truncation=True, return_tensors="pt")
        # the causal LM's inner model: the same hidden states without the vocabulary logits
        body = getattr(encoder, "model", encoder)
        out = body(input_ids=tokens.input_ids.to(encoder.device),
                   attention_mask=tokens.attention_mask.to(encoder.device),
                   output_hidden_states=True, use_cache=False)
        states = torch.stack([out.hidden_states[k] for k in self.layers], dim=2)
        return states.flatten(2)  # [batch, tokens, layers x width], layer-major per token


def flux2_prompt_encoder(model, embeddings, clip_skip, max_tokens, chunking) -> Flux2PromptEncoder:
    if embeddings:
        raise ValueError("Flux.2 Klein: textual-inversion embeddings are not supported for "
                         "this family")
    return Flux2PromptEncoder(model)


def latent_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(0, row, column, 0) per token, as Flux2KleinPipeline._prepare_latent_ids."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    zero = torch.zeros_like(rows)
    return torch.stack([zero, rows, cols, zero], dim=-1).reshape(-1, 4).to(device, dtype)


def text_ids(length: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(length, 4)
    ids[:, 3] = torch.arange(length)
    return ids.to(device, dtype)


def flux2_prediction(transformer, noisy: torch.Tensor, timesteps: torch.Tensor, context,
                     added_cond: dict | None, dtype: torch.dtype) -> torch.Tensor:
    """The velocity noise - x for normalised 128-channel latents noised to
    sigma = timesteps / 1000."""
    from trainers.step import Guided
    if isinstance(context, Guided):
        raise ValueError("Flux.2 Klein: guidance in the loss (DreamArtist) is not supported")
    batch, channels, height, width = noisy.shape
    expected = transformer.config.in_channels
    if channels != expected:
        raise ValueError(f"Flux.2 Klein: latents of {channels} channels; the transformer takes "
                         f"{expected} (the VAE's latents patched 2x2 and normalised: "
                         "trainers.flux2_model.Flux2Latents)")
    tokens = noisy.to(dtype).flatten(2).transpose(1, 2)
    out = transformer(hidden_states=tokens, encoder_hidden_states=context.to(dtype),
                      timestep=(timesteps / 1000).to(dtype), guidance=None,
                      img_ids=latent_ids(height, width, noisy.device, dtype),
                      txt_ids=text_ids(context.shape[1], noisy.device, dtype),
                      return_dict=False)[0]
    return out.transpose(1, 2).reshape(batch, channels, height, width)


def _is_distilled(model) -> bool:
    """Whether the folder's pipeline is step-distilled (Klein 4B / 9B: no CFG); the base
    models' folders say false."""
    try:
        index = json.loads((Path(model.source) / "model_index.json").read_text())
    except (OSError, ValueError, TypeError):
        return False
    return bool(index.get("is_distilled", False))


def flux2_pipeline(model, transformer, scheduler):
    """Flux2KleinPipeline around the live transformer and the real VAE; it always samples with
    its own flow-matching Euler scheduler (the SD samplers do not apply)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    vae = model.vae.vae if isinstance(model.vae, Flux2Latents) else model.vae
    return _pipeline_class()(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
        vae=vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        transformer=transformer, is_distilled=_is_distilled(model))


def build_flux2_components(seed: int = 0, width: int = 32, text_width: int = 16):
    """Flux.2 Klein 4B's shape: (transformer, vae, text_encoder Qwen3-like). One double- and
    one single-stream block, `width` wide in heads of 16 (real: 3072, 5 + 20 blocks, 24 heads
    of 128), 4 rotary axes; Flux.2's VAE shape (32 latent channels, batch-norm statistics over
    the 128 patched channels, here away from 0 / 1 so the normalisation shows); a 28-layer
    Qwen3 `text_width` wide (real: Qwen3-4B, 36 layers, 2560) so layers 9, 18 and 27 exist and
    27 is not the last (the last state is the normed one)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=width // 16, joint_attention_dim=len(LAYERS) * text_width,
        timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000, guidance_embeds=False)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=32, layers_per_block=1,
        block_out_channels=(16, 16, 32, 32), norm_num_groups=8, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.3)
        vae.bn.running_var.uniform_(0.5, 2.0)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=QWEN_VOCAB, hidden_size=text_width, intermediate_size=32, num_hidden_layers=28,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        rope_theta=1000000.0, tie_word_embeddings=True))
    return transformer, vae, text_encoder
