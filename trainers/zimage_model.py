"""Z-Image's hooks (trainers/families/zimage.py): captions to conditioning, one transformer
prediction on latents, the preview pipeline around the live modules, and the tiny demo's
modules.

Conditioning is what ZImagePipeline computes: each caption wrapped in Qwen3's chat template
(a user turn and the assistant prompt, thinking enabled), padded to `max_sequence_length`
tokens, and the text model's second-to-last hidden states. The pipeline then drops the padding
per caption (the transformer takes a list of variable-length sequences); Danlu keeps the padded
states so captions batch and memoize like every other family, and carries the attention mask
in the `pooled` slot of the condition, so the predict hook trims each row as the pipeline does.

A prediction gives the transformer a list of [C, 1, H, W] latents (one frame), the time
1 - sigma (it counts from noise at 0 to clean at 1, where Danlu's sigma runs the other way) and
the trimmed caption states. ZImagePipeline negates the transformer's output before its Euler
step, so the output is x - noise; the hook returns its negation, noise - x, the velocity
Danlu's flow-matching objective trains."""
from __future__ import annotations

import torch

from trainers.conditioning import PooledCondition

TOKENS = 512  # ZImagePipeline's default max_sequence_length
QWEN_VOCAB = 608  # the demo's tokenizer has 605 tokens (trainers/qwen_tokenizer_files.py)


class ZImageCondition(PooledCondition):
    """[batch, tokens, text width] padded hidden states; `pooled` is the [batch, tokens]
    attention mask (1 for a caption's own tokens), not a pooled text vector."""

    @property
    def mask(self) -> torch.Tensor:
        return self.pooled > 0.5

    def trimmed(self) -> list[torch.Tensor]:
        """Each caption's states without its padding, as ZImagePipeline.encode_prompt gives."""
        return [row[keep] for row, keep in zip(self.context, self.mask)]

    def pipeline_embeds(self) -> dict:
        """The prompt (and, encoded with it, the negative prompt) as ZImagePipeline's lists."""
        rows = self.trimmed()
        return {"prompt_embeds": rows[:1], "negative_prompt_embeds": rows[1:2]}


class ZImagePromptEncoder:
    def __init__(self, model, max_sequence_length: int = TOKENS):
        self.model = model
        self.max_sequence_length = max_sequence_length

    @property
    def text_encoder(self):
        return self.model.text_encoder

    def encode(self, texts: list[str]) -> ZImageCondition:
        tokenizer, encoder = self.model.tokenizer, self.model.text_encoder
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=True) for text in texts]
        tokens = tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length,
                           truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device).bool()
        states = encoder(input_ids=tokens.input_ids.to(encoder.device), attention_mask=mask,
                         output_hidden_states=True).hidden_states[-2]
        return ZImageCondition(context=states, pooled=mask.to(states.dtype))


def zimage_prompt_encoder(model, embeddings, clip_skip, max_tokens, chunking) -> ZImagePromptEncoder:
    if embeddings:
        raise ValueError("Z-Image: textual-inversion embeddings are not supported for this family")
    return ZImagePromptEncoder(model)


def zimage_prediction(transformer, noisy: torch.Tensor, timesteps: torch.Tensor, context,
                      added_cond: dict | None, dtype: torch.dtype) -> torch.Tensor:
    """The velocity noise - x for latents noised to sigma = timesteps / 1000."""
    from trainers.step import Guided
    if isinstance(context, Guided):
        raise ValueError("Z-Image: guidance in the loss (DreamArtist) is not supported")
    height, width = noisy.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"Z-Image: latents of {height}x{width} do not divide into 2x2 patches "
                         "(the image size must be a multiple of 16)")
    mask = (added_cond or {}).get("pooled_projections")
    if mask is None:
        raise ValueError("Z-Image: the conditioning carries no caption mask "
                         "(encode captions with the Z-Image prompt encoder)")
    captions = [row[keep].to(dtype) for row, keep in zip(context, mask > 0.5)]
    images = list(noisy.to(dtype).unsqueeze(2).unbind(0))
    out = transformer(images, (1000 - timesteps.float()) / 1000, captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def zimage_pipeline(model, transformer, scheduler):
    """ZImagePipeline around the live transformer; it always samples with its own
    flow-matching Euler scheduler (the SD samplers do not apply)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        transformer=transformer)


def build_zimage_components(seed: int = 0, width: int = 32, text_width: int = 32):
    """Z-Image-Turbo's shape: (transformer, vae, text_encoder Qwen3-like). One main layer and
    one noise and one context refiner, `width` wide (real: 3840, 30 layers, 2 refiners), two
    heads of 16 (real: 30 of 128); a two-layer Qwen3 `text_width` wide (real: 2560, 36 layers);
    Flux's VAE shape (Z-Image uses Flux's VAE)."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from trainers.tiny_model import _flux_vae

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=width, n_layers=1,
        n_refiner_layers=1, n_heads=width // 16, n_kv_heads=width // 16, cap_feat_dim=text_width,
        axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])
    vae = _flux_vae()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=QWEN_VOCAB, hidden_size=text_width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
        rope_theta=1000000.0, tie_word_embeddings=True))
    return transformer, vae, text_encoder
