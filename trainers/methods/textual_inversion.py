"""Textual inversion: train the vectors of one embedding; everything else stays frozen."""
from __future__ import annotations

from pathlib import Path

import torch

from core import events as ev
from trainers.captions import read_template
from trainers.configs import TextualInversionConfig
from trainers.data import load_dataset
from trainers.embeddings import find_embedding
from trainers.loop import TrainingError, TrainingPlan, train
from trainers.models import load_model
from trainers.preflight import check_before_queueing
from trainers.prompts import PromptEncoder


def run(cfg: TextualInversionConfig, ctx) -> Path:
    from trainers.formats.embedding import (EmbeddingFile, embedding_checksum, load_embedding,
                                            save_embedding)
    from trainers.formats.png_embedding import save_png_embedding

    cfg.validate()
    paths = ctx.paths
    check_before_queueing(cfg, paths)
    name = cfg.embedding.strip()
    path = find_embedding(paths, name)
    if path is None:
        raise TrainingError(f"embedding: no embedding named {name!r} in {paths.embeddings}")
    template_lines = read_template(paths.templates, cfg.template)
    ctx.emit(ev.Status(f"Loading model {cfg.model}"))
    model = load_model(paths, cfg.model)
    stored = load_embedding(path)
    if isinstance(stored.vectors, dict):
        raise TrainingError(f"embedding: {path.name} is an SDXL embedding; this model is SD1-shaped")
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    if stored.vectors.shape[1] != width:
        raise TrainingError(f"embedding: {path.name} has vectors of width {stored.vectors.shape[1]}, "
                            f"but {cfg.model}'s text encoder uses {width}; it was made for another model")
    ctx.emit(ev.Status("Preparing dataset"))
    dataset = load_dataset(paths.resolve(cfg.data_root, "data_root"), model.vae, cfg.width, cfg.height,
                           varsize=cfg.varsize, batch_size=cfg.batch_size, seed=cfg.seed,
                           latent_sampling=cfg.latent_sampling, use_weight=cfg.use_weight,
                           word_regex=cfg.filename_word_regex, join_string=cfg.filename_join_string,
                           report=lambda text: ctx.emit(ev.Status(text)))
    if dataset.skipped:
        listed = "; ".join(f"{file} ({why})" for file, why in dataset.skipped[:10])
        ctx.emit(ev.Status(f"Skipped {len(dataset.skipped)} unreadable files: {listed}"))

    vectors = torch.nn.Parameter(stored.vectors.detach().float().clone())
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, {name: vectors})

    def as_file(step: int) -> EmbeddingFile:
        return EmbeddingFile(name=name, vectors=vectors.detach().cpu().clone(), step=step,
                             sd_checkpoint=model.short_hash,
                             sd_checkpoint_name=Path(model.name).stem)

    def save(target: Path, step: int) -> None:
        save_embedding(target, as_file(step))

    def on_preview(image, step, run) -> None:
        if cfg.save_image_with_embedded:
            save_png_embedding(run.sub("image_embeddings") / f"{name}-{step}.png", image,
                               as_file(step), caption=f"{name}, {step} steps")

    plan = TrainingPlan(
        name=name, parameters=[vectors], weight_decay=0.0, encode=encoder.encode,
        prompt_encoder=encoder, save=save, checksum=lambda: embedding_checksum(vectors.detach()),
        final_path=path, copies_folder="embeddings", start_step=int(stored.step or 0),
        on_preview=on_preview, describe={"embedding": str(path), "vectors": int(vectors.shape[0])})
    return train(cfg, model, dataset, template_lines, plan, ctx, "textual_inversion_loss.csv")
