"""Textual inversion: train the vectors of one embedding; everything else stays frozen."""
from __future__ import annotations

from pathlib import Path

import torch

from trainers import catalog
from trainers import template_training as tt
from trainers.configs import TextualInversionConfig
from trainers.embeddings import create_missing_embedding, find_embedding
from trainers.formats.embedding import (EmbeddingFile, embedding_checksum, load_embedding,
                                        save_embedding)
from trainers.formats.png_embedding import save_png_embedding
from trainers.loop import TrainingError, TrainingPlan, train
from trainers.catalog import require_family
from trainers.conditioning import prompt_encoder


def run(cfg: TextualInversionConfig, ctx) -> Path:
    model, dataset, template_lines = tt.prepare(cfg, ctx)
    name = cfg.embedding.strip()
    create_missing_embedding(cfg, ctx)  # only with create_missing, after the checks passed
    path = find_embedding(ctx.paths, name)
    stored = load_embedding(path)
    _check_fits(stored, model, path, cfg.model)
    device = model.unet.device
    halves = model.spec.embedding_halves  # one set of vectors per text encoder, or one tensor
    if halves:
        per_encoder = {k: torch.nn.Parameter(v.detach().float().clone().to(device))
                       for k, v in stored.vectors.items()}
        encoder = prompt_encoder(model, {name: per_encoder}, max_tokens=cfg.max_token_length)
        trained = [per_encoder[k] for k in halves]
        current = lambda: {k: v.detach().cpu().clone() for k, v in per_encoder.items()}  # noqa: E731
    else:
        vectors = torch.nn.Parameter(stored.vectors.detach().float().clone().to(device))
        encoder = prompt_encoder(model, {name: vectors}, max_tokens=cfg.max_token_length)
        trained = [vectors]
        current = lambda: vectors.detach().cpu().clone()  # noqa: E731
    optimizer = torch.optim.AdamW(trained, lr=0.0, weight_decay=0.0)

    def as_file(step: int) -> EmbeddingFile:
        return EmbeddingFile(name=name, vectors=current(), step=step,
                             sd_checkpoint=model.short_hash,
                             sd_checkpoint_name=Path(model.name).stem)

    def on_preview(image, step, run) -> None:
        if cfg.save_image_with_embedded:
            save_png_embedding(run.sub("image_embeddings") / f"{name}-{step}.png", image,
                               as_file(step), caption=f"{name}, {step} steps")

    plan = TrainingPlan(
        name=name, optimizer=optimizer, rates=tt.rates(cfg), encode=encoder.encode,
        prompt_encoder=encoder, save=lambda target, step: save_embedding(target, as_file(step)),
        checksum=lambda: embedding_checksum(current()), final_path=path,
        copies_folder=catalog.get("textual_inversion").copies_folder, previews=tt.previews(cfg, name),
        start_step=int(stored.step or 0), on_preview=on_preview)
    opts = tt.loop_options(cfg, model, catalog.get("textual_inversion").loss_csv,
                           {"method": "textual_inversion", "embedding": str(path),
                            "vectors": stored.num_vectors, "images": len(dataset.examples)})
    return train(model, tt.TemplateBatches(dataset, template_lines, name, cfg), plan, opts, ctx)


def _check_fits(stored: EmbeddingFile, model, path: Path, model_name: str) -> None:
    """The embedding's vectors must have the width of the text encoder(s) they go into."""
    halves = model.spec.embedding_halves
    if stored.is_sdxl != bool(halves):
        kind = "an SDXL embedding (clip_l + clip_g)" if stored.is_sdxl else "a single-encoder embedding"
        raise TrainingError(f"embedding: {path.name} is {kind}, but {model_name} is a "
                            f"{model.spec.label} model; it was made for another model family")
    encoders = dict(zip(halves or ("",), model.text_encoders))
    for key, vectors in (stored.vectors if halves else {"": stored.vectors}).items():
        width = encoders[key].get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            which = f" {key}" if key else ""
            raise TrainingError(f"embedding: {path.name}{which} has vectors of width "
                                f"{vectors.shape[1]}, but {model_name}'s text encoder uses "
                                f"{width}; it was made for another model")


def load_trainable(path: Path, model, model_name: str) -> EmbeddingFile:
    """An SD 1.x/2.x embedding file whose vectors fit this model's text encoder (for APT)."""
    require_family("apt", model, model_name)
    stored = load_embedding(path)
    _check_fits(stored, model, path, model_name)
    return stored
