"""What the U-Net is conditioned on, per model family.

SD 1.x / 2.x: the text encoder's hidden states (PromptEncoder). SDXL: both text encoders'
penultimate hidden states side by side (768 + 1280 = 2048 wide), the second encoder's pooled
projection, and six size/crop numbers per image (`add_time_ids`: original height and width,
crop top and left, target height and width), as SDXL was trained and as kohya and diffusers
condition it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from trainers.prompt_chunks import join
from trainers.prompts import PromptEncoder, _spliced

# (original (h, w), crop top-left (top, left), target (h, w)) of one training image
SizeInfo = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass
class PooledCondition:
    """A context sequence and a pooled text vector per caption (SDXL, Flux)."""
    context: torch.Tensor  # [batch, tokens, width]
    pooled: torch.Tensor   # [batch, pooled width]

    def rows(self) -> list["PooledCondition"]:
        """One condition per caption (unbatched tensors), for memoizing captions."""
        return [type(self)(c, p) for c, p in zip(self.context, self.pooled)]

    @classmethod
    def stack(cls, rows: Sequence["PooledCondition"]) -> "PooledCondition":
        return cls(torch.stack([r.context for r in rows]), torch.stack([r.pooled for r in rows]))


class SdxlCondition(PooledCondition):
    """[batch, 77, width_1 + width_2] context; the second encoder's pooled projection."""


def _hidden_states(encoder: PromptEncoder, rows):
    """The text model's outputs for chunk rows (PromptEncoder.chunk_rows), with every layer's
    hidden states, embeddings spliced in."""
    input_ids, splices, _ = rows
    model = encoder.text_encoder
    with _spliced(model.get_input_embeddings(), splices):
        return model(input_ids, output_hidden_states=True)


class SdxlPromptEncoder:
    """SDXL's two CLIP encoders. `embeddings` maps a name to {"clip_l": [n, 768], "clip_g":
    [n, 1280]} (the SDXL embedding file's two halves); each half is spliced into its encoder.
    `clip_skip` 1 uses the penultimate layer (SDXL's own choice), 2 the one before, and so on.

    Captions longer than 75 tokens (`max_tokens` 150 / 225) are encoded in 75-token chunks by
    each encoder, and each encoder's chunk states are joined as `chunking` says (A1111: whole
    77-position chunks; kohya's sdxl trainers: the first BOS, every chunk's 75 inner states, the
    last position) before the two are put side by side; the pooled projection is the first
    chunk's, as both kohya and A1111 take it."""

    def __init__(self, model, embeddings: dict[str, dict[str, torch.Tensor]] | None = None,
                 clip_skip: int = 1, max_tokens: int = 75, chunking: str = "a1111"):
        embeddings = dict(embeddings or {})
        self.one = PromptEncoder(model.tokenizer, model.text_encoder,
                                 {k: v["clip_l"] for k, v in embeddings.items()},
                                 max_tokens=max_tokens, chunking=chunking)
        self.two = PromptEncoder(model.tokenizer_2, model.text_encoder_2,
                                 {k: v["clip_g"] for k, v in embeddings.items()},
                                 max_tokens=max_tokens, chunking=chunking)
        self.clip_skip = max(1, int(clip_skip))
        self.chunking = chunking

    @property
    def text_encoder(self):  # what previews and checks look at first
        return self.one.text_encoder

    def encode(self, texts: list[str]) -> SdxlCondition:
        layer = -1 - self.clip_skip
        rows_one = self.one.chunk_rows(texts)
        rows_two = self.two.chunk_rows(texts, rows_one[2])
        if rows_two[2] > rows_one[2]:  # both encoders get as many chunks
            rows_one = self.one.chunk_rows(texts, rows_two[2])
        count = rows_two[2]
        first = _hidden_states(self.one, rows_one)
        second = _hidden_states(self.two, rows_two)
        joined = [join(states.hidden_states[layer].reshape(len(texts), count, -1,
                                                           states.hidden_states[layer].shape[-1]),
                       self.chunking) for states in (first, second)]
        context = torch.cat([joined[0], joined[1].to(joined[0])], dim=-1)
        pooled = second.text_embeds.reshape(len(texts), count, -1)[:, 0]
        return SdxlCondition(context=context, pooled=pooled)


def prompt_encoder(model, embeddings: dict | None = None, clip_skip: int = 1,
                   max_tokens: int = 75, chunking: str = "a1111"):
    """The prompt encoder of the model's family (its `prompt_encoder`: clip_prompt_encoder or
    sdxl_prompt_encoder below); captions of more than 75 tokens are chunked
    (trainers/prompt_chunks.py)."""
    return model.spec.hook("prompt_encoder")(model, embeddings, clip_skip, max_tokens, chunking)


def clip_prompt_encoder(model, embeddings, clip_skip, max_tokens, chunking) -> PromptEncoder:
    """One CLIP text encoder's last (or clip_skip-th) hidden states (SD 1.x / 2.x)."""
    return PromptEncoder(model.tokenizer, model.text_encoder, embeddings, clip_skip=clip_skip,
                         max_tokens=max_tokens, chunking=chunking)


def sdxl_prompt_encoder(model, embeddings, clip_skip, max_tokens, chunking) -> SdxlPromptEncoder:
    return SdxlPromptEncoder(model, embeddings, clip_skip, max_tokens=max_tokens,
                             chunking=chunking)


def stack_conditions(rows: list):
    """One batch from per-caption conditionings: tensors, or PooledCondition.rows()."""
    if isinstance(rows[0], PooledCondition):
        return type(rows[0]).stack(rows)
    return torch.stack(rows)


def time_ids(sizes: Sequence[SizeInfo] | None, latents: torch.Tensor,
             vae_scale: int = 8) -> torch.Tensor:
    """[batch, 6] SDXL size/crop conditioning; without per-image sizes, each image is taken as
    uncropped at the training size (what A1111 and diffusers' scripts do for square data)."""
    if not sizes:
        height, width = (int(v) * vae_scale for v in latents.shape[-2:])
        sizes = [((height, width), (0, 0), (height, width))] * latents.shape[0]
    return torch.tensor([[*original, *crop, *target] for original, crop, target in sizes],
                        dtype=torch.float32)


def unet_inputs(encoded, latents: torch.Tensor, sizes: Sequence[SizeInfo] | None = None,
                vae_scale: int = 8) -> tuple[torch.Tensor, dict | None]:
    """(encoder_hidden_states, the family's extra conditioning or None) for the denoiser."""
    if isinstance(encoded, SdxlCondition):
        return encoded.context, {"text_embeds": encoded.pooled,
                                 "time_ids": time_ids(sizes, latents, vae_scale)}
    if isinstance(encoded, PooledCondition):
        return encoded.context, {"pooled_projections": encoded.pooled}
    return encoded, None
