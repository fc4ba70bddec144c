"""Textual inversion: train the vectors of one embedding; everything else stays frozen."""
from __future__ import annotations

from pathlib import Path

import torch

from trainers import template_training as tt
from trainers.configs import TextualInversionConfig
from trainers.embeddings import find_embedding
from trainers.formats.embedding import (EmbeddingFile, embedding_checksum, load_embedding,
                                        save_embedding)
from trainers.formats.png_embedding import save_png_embedding
from trainers.loop import TrainingError, TrainingPlan, train
from trainers.prompts import PromptEncoder


def run(cfg: TextualInversionConfig, ctx) -> Path:
    model, dataset, template_lines = tt.prepare(cfg, ctx)
    name = cfg.embedding.strip()
    path = find_embedding(ctx.paths, name)
    stored = load_embedding(path)
    if isinstance(stored.vectors, dict):
        raise TrainingError(f"embedding: {path.name} is an SDXL embedding; this model is SD1-shaped")
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    if stored.vectors.shape[1] != width:
        raise TrainingError(f"embedding: {path.name} has vectors of width {stored.vectors.shape[1]}, "
                            f"but {cfg.model}'s text encoder uses {width}; it was made for another model")

    vectors = torch.nn.Parameter(stored.vectors.detach().float().clone().to(model.unet.device))
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, {name: vectors})
    optimizer = torch.optim.AdamW([vectors], lr=0.0, weight_decay=0.0)

    def as_file(step: int) -> EmbeddingFile:
        return EmbeddingFile(name=name, vectors=vectors.detach().cpu().clone(), step=step,
                             sd_checkpoint=model.short_hash,
                             sd_checkpoint_name=Path(model.name).stem)

    def on_preview(image, step, run) -> None:
        if cfg.save_image_with_embedded:
            save_png_embedding(run.sub("image_embeddings") / f"{name}-{step}.png", image,
                               as_file(step), caption=f"{name}, {step} steps")

    plan = TrainingPlan(
        name=name, optimizer=optimizer, rates=tt.rates(cfg), encode=encoder.encode,
        prompt_encoder=encoder, save=lambda target, step: save_embedding(target, as_file(step)),
        checksum=lambda: embedding_checksum(vectors.detach()), final_path=path,
        copies_folder="embeddings", previews=tt.previews(cfg, name),
        start_step=int(stored.step or 0), on_preview=on_preview)
    opts = tt.loop_options(cfg, model, "textual_inversion_loss.csv",
                           {"method": "textual_inversion", "embedding": str(path),
                            "vectors": int(vectors.shape[0]), "images": len(dataset.examples)})
    return train(model, tt.TemplateBatches(dataset, template_lines, name, cfg), plan, opts, ctx)
