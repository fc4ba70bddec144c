"""Chroma's hooks (trainers/families/chroma.py): captions to conditioning, one transformer
prediction on latents, the preview pipeline around the live modules, and the tiny demo's
modules.

Conditioning is what ChromaPipeline computes: T5's last hidden states for the caption padded to
`max_sequence_length`, with the tokenizer's attention mask given to T5, and the transformer's
text mask: the caption's tokens and its first padding token (Chroma was trained seeing exactly
one pad). The states stay padded so captions batch and memoize like every other family; the
mask rides in the condition's `pooled` slot (Chroma has no pooled vector).

The mask is used as a keep/drop mask, as Chroma's reference code and ComfyUI use it. diffusers
0.42.1's ChromaPipeline hands it to the transformer as 0/1 floats, which scaled-dot-product
attention adds to the scores instead of masking (diffusers issues #12116, #13619), so its
padding is not dropped. A prediction therefore trims the text to the longest kept length in the
batch (tokens no query may see only cost time: text ids are all zero, so a token's place does
not change its rotary embedding) and passes a boolean mask only when captions keep different
lengths; previews give the pipeline the trimmed states with an all-True boolean mask. Under
gradient checkpointing diffusers' single blocks drop the mask, so such a batch runs one caption
at a time.

Otherwise a prediction is Flux's: 2x2 packed latents with (0, row, column) ids, all-zero text
ids, sigma as the timestep (the transformer scales it by 1000), output unpacked."""
from __future__ import annotations

import torch

from trainers.conditioning import PooledCondition
from trainers.flux_model import image_ids, pack, unpack

T5_TOKENS = 512  # ChromaPipeline's default max_sequence_length


class ChromaCondition(PooledCondition):
    """[batch, T5 tokens, T5 width] padded states; `pooled` is the [batch, tokens] mask of the
    tokens the transformer sees (1: the caption and its first pad), not a pooled vector."""

    @property
    def mask(self) -> torch.Tensor:
        return self.pooled > 0.5

    def trimmed(self) -> list[torch.Tensor]:
        """Each caption's states without the padding the transformer does not see."""
        return [row[keep] for row, keep in zip(self.context, self.mask)]

    def pipeline_embeds(self) -> dict:
        """The prompt (and, encoded with it, the negative prompt) as ChromaPipeline's
        arguments: trimmed states with all-True boolean masks."""
        rows = self.trimmed()
        embeds = {"prompt_embeds": rows[0][None],
                  "prompt_attention_mask": torch.ones(1, len(rows[0]), dtype=torch.bool,
                                                      device=rows[0].device)}
        if len(rows) > 1:
            embeds["negative_prompt_embeds"] = rows[1][None]
            embeds["negative_prompt_attention_mask"] = torch.ones(
                1, len(rows[1]), dtype=torch.bool, device=rows[1].device)
        return embeds


class ChromaPromptEncoder:
    def __init__(self, model, max_sequence_length: int = T5_TOKENS):
        self.model = model
        self.max_sequence_length = max_sequence_length

    @property
    def text_encoder(self):
        return self.model.text_encoder

    def encode(self, texts: list[str]) -> ChromaCondition:
        tokenizer, encoder = self.model.tokenizer, self.model.text_encoder
        tokens = tokenizer(texts, padding="max_length", max_length=self.max_sequence_length,
                           truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(encoder.device)
        states = encoder(tokens.input_ids.to(encoder.device), attention_mask=mask,
                         output_hidden_states=False)[0]
        positions = torch.arange(mask.shape[1], device=mask.device)[None]
        seen = positions <= mask.sum(dim=1, keepdim=True)  # the caption and its first pad
        return ChromaCondition(context=states, pooled=seen.to(states.dtype))


def chroma_prompt_encoder(model, embeddings, clip_skip, max_tokens, chunking) -> ChromaPromptEncoder:
    if embeddings:
        raise ValueError("Chroma: textual-inversion embeddings are not supported for this family")
    return ChromaPromptEncoder(model)


def chroma_prediction(transformer, noisy: torch.Tensor, timesteps: torch.Tensor, context,
                      added_cond: dict | None, dtype: torch.dtype) -> torch.Tensor:
    from trainers.step import Guided
    if isinstance(context, Guided):
        raise ValueError("Chroma: guidance in the loss (DreamArtist) is not supported")
    height, width = noisy.shape[-2:]
    if height % 2 or width % 2:
        raise ValueError(f"Chroma: latents of {height}x{width} do not divide into 2x2 patches "
                         "(the image size must be a multiple of 16)")
    mask = (added_cond or {}).get("pooled_projections")
    if mask is None:
        raise ValueError("Chroma: the conditioning carries no caption mask "
                         "(encode captions with the Chroma prompt encoder)")
    keep = mask > 0.5
    length = max(int(keep.sum(dim=1).max()), 1)
    context, keep = context[:, :length], keep[:, :length]
    tokens = pack(noisy.to(dtype))
    attention_mask = None
    if not keep.all():
        if getattr(transformer, "gradient_checkpointing", False) and torch.is_grad_enabled():
            return torch.cat([
                chroma_prediction(transformer, noisy[i:i + 1], timesteps[i:i + 1],
                                  context[i:i + 1], {"pooled_projections": mask[i:i + 1]}, dtype)
                for i in range(len(noisy))])
        attention_mask = torch.cat(
            [keep, torch.ones(len(tokens), tokens.shape[1], dtype=torch.bool, device=keep.device)],
            dim=1)
    out = transformer(
        hidden_states=tokens, encoder_hidden_states=context.to(dtype),
        timestep=(timesteps / 1000).to(dtype),
        img_ids=image_ids(height, width, noisy.device, dtype),
        txt_ids=torch.zeros(length, 3, device=noisy.device, dtype=dtype),
        attention_mask=attention_mask, return_dict=False)[0]
    return unpack(out, height, width)


def chroma_pipeline(model, transformer, scheduler):
    """ChromaPipeline around the live transformer; it always samples with its own
    flow-matching Euler scheduler (the SD samplers do not apply)."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config),
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        transformer=transformer)


def build_chroma_components(seed: int = 0, width: int = 32, t5_width: int = 48):
    """Chroma1-HD's shape: (transformer, vae, text_encoder T5-like). One double- and one
    single-stream block, `width` wide in heads of 16 (real: 3072, 19 + 38 blocks, 24 heads of
    128), an approximator of 2 layers 32 wide on 16 channels (real: 5 layers, 5120 on 64); a
    two-layer T5 `t5_width` wide (real: T5-XXL, 4096) and Flux's VAE shape."""
    from diffusers import ChromaTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from trainers.tiny_model import T5_VOCAB, _flux_vae

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=width // 16, joint_attention_dim=t5_width, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)
    vae = _flux_vae()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=T5_VOCAB, d_model=t5_width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return transformer, vae, text_encoder
