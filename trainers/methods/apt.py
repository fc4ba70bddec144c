"""Advanced prompt tuning (DreamArtist): textual inversion of a positive embedding and its
'<name>-neg' partner at once. Each caption is encoded twice (the name, then '<name>-neg' in its
place) and the U-Net's two predictions are combined with classifier-free guidance before the
loss, so the pair learns to work as prompt and negative prompt. Optional: an L1 loss on the
image decoded from the predicted latents, and an EMA of both embeddings. The two files are
ordinary embeddings."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from core import events as ev
from trainers import seeds
from trainers import catalog
from trainers import template_training as tt
from trainers.apt_prompts import negative_name, negative_prompt, pair_negative
from trainers.configs import AptConfig
from trainers.embeddings import create_missing_embedding, find_embedding
from trainers.formats.embedding import EmbeddingFile, embedding_checksum, save_embedding
from trainers.formats.optim_sidecar import load_optim, recover_pair
from trainers.formats.png_embedding import save_png_embedding
from trainers.loop import TrainingPlan, train
from trainers.methods.textual_inversion import load_trainable
from trainers.prompts import PromptEncoder
from trainers.sampling import PreviewSettings
from trainers.step import Guided

def run(cfg: AptConfig, ctx) -> Path:
    model, dataset, template_lines = tt.prepare(cfg, ctx, keep_pixels=cfg.reconstruction_weight > 0)
    name = cfg.embedding.strip()
    create_missing_embedding(cfg, ctx)  # only with create_missing, after the checks passed
    path = find_embedding(ctx.paths, name)
    if path is not None:  # an interrupted save of the pair is finished or dropped first
        recover_pair(path, (path.with_name(negative_name(name) + path.suffix),))
    stored = load_trainable(path, model, cfg.model)
    neg_path, neg_vectors = _negative(ctx, cfg, path, stored, model)
    device = model.unet.device
    pair = {name: torch.nn.Parameter(stored.vectors.float().clone().to(device)),
            negative_name(name): torch.nn.Parameter(neg_vectors.float().clone().to(device))}
    files = {name: path, negative_name(name): neg_path}
    ema = {key: value.detach().clone() for key, value in pair.items()} if cfg.ema_decay else None
    _resume_raw(path, pair, ema, ctx)
    encoder = PromptEncoder(model.tokenizer, model.text_encoder, dict(pair),
                            max_tokens=cfg.max_token_length)
    optimizer = torch.optim.AdamW([{"params": [pair[name]]},
                                   {"params": [pair[negative_name(name)]]}], lr=0.0,
                                  weight_decay=0.0)
    schedule = tt.rates(cfg)

    def rates(step: int):
        rate = schedule(step)
        return None if rate is None else [rate[0], rate[0] * cfg.negative_lr_weight]

    def saved(key: str) -> torch.Tensor:
        return (ema or pair)[key].detach().cpu().clone()

    def save(target: Path, step: int) -> None:
        """The final files, or a run's periodic copies <name>-<step> and <name>-neg-<step>."""
        copy = target != path
        for key, final in files.items():
            where = (target.with_name(f"{key}-{step}{target.suffix}") if copy else final)
            save_embedding(where, EmbeddingFile(name=key, vectors=saved(key), step=step,
                                                sd_checkpoint=model.short_hash,
                                                sd_checkpoint_name=Path(model.name).stem))

    def encode(texts: list[str]) -> Guided:
        both = encoder.encode(texts + [negative_prompt(t, name) for t in texts])
        return Guided(both[:len(texts)], both[len(texts):], cfg.cfg_scale)

    def after_step(step: int) -> None:
        if ema is not None:
            with torch.no_grad():
                for key, value in pair.items():
                    ema[key].mul_(cfg.ema_decay).add_(value.detach(), alpha=1 - cfg.ema_decay)

    @contextlib.contextmanager
    def preview_with_ema():
        if ema is not None:
            encoder.embeddings.update(ema)
        try:
            yield
        finally:
            encoder.embeddings.update(pair)

    def on_preview(image, step, run) -> None:
        if cfg.save_image_with_embedded:  # the positive embedding, as DreamArtist does
            save_png_embedding(run.sub("image_embeddings") / f"{name}-{step}.png", image,
                               EmbeddingFile(name=name, vectors=saved(name), step=step,
                                             sd_checkpoint=model.short_hash,
                                             sd_checkpoint_name=Path(model.name).stem),
                               caption=f"{name}, {step} steps")

    plan = TrainingPlan(
        name=name, optimizer=optimizer, rates=rates, encode=encode, prompt_encoder=encoder,
        save=save, checksum=lambda: _checksum(saved(name), saved(negative_name(name))),
        final_path=path, copies_folder=catalog.get("apt").copies_folder, previews=_previews(cfg, name),
        start_step=int(stored.step or 0), preview_context=preview_with_ema,
        after_step=after_step, on_preview=on_preview, x0_loss=_reconstruction(cfg, model),
        state_tensors=lambda: list(ema.values()) if ema is not None else [],
        sidecar_extra=lambda: {"apt_raw": {k: v.detach().cpu().clone() for k, v in pair.items()}})
    opts = tt.loop_options(cfg, model, catalog.get("apt").loss_csv,
                           {"method": "apt", "embedding": str(path),
                            "negative_embedding": str(neg_path),
                            "vectors": int(pair[name].shape[0]), "images": len(dataset.examples)})
    return train(model, tt.TemplateBatches(dataset, template_lines, name, cfg), plan, opts, ctx)


def _negative(ctx, cfg: AptConfig, path: Path, stored, model) -> tuple[Path, torch.Tensor]:
    """The '-neg' partner: its file if there is one, else (as DreamArtist creates it) the
    positive's vectors plus a little noise, written when the run first saves."""
    name = negative_name(cfg.embedding.strip())
    found = find_embedding(ctx.paths, name)
    if found is not None:
        return found, load_trainable(found, model, cfg.model).vectors
    ctx.emit(ev.Status(f"Starting the negative embedding {name} from {path.name}"))
    noise = torch.randn(stored.vectors.shape, generator=seeds.generator(cfg.seed, "apt-neg"))
    return path.with_name(name + path.suffix), stored.vectors.float() + 1e-3 * noise


def _checksum(positive: torch.Tensor, negative: torch.Tensor) -> str:
    return embedding_checksum(positive) + embedding_checksum(negative)


def _resume_raw(path: Path, pair: dict, ema: dict | None, ctx) -> None:
    """With EMA the files hold the averages; the raw vectors the optimizer trains come back
    from the sidecar (when it belongs to these files), so a resumed run repeats exactly."""
    if ema is None:
        return
    payload, _ = load_optim(path, _checksum(*(ema[k].cpu() for k in pair)))
    raw = ((payload or {}).get("danlu") or {}).get("apt_raw") or {}
    if set(raw) == set(pair) and all(raw[k].shape == pair[k].shape for k in pair):
        with torch.no_grad():
            for key, value in pair.items():
                value.copy_(raw[key].to(value.device))
        ctx.emit(ev.Status("Continuing from the raw (non-averaged) vectors in the sidecar"))


def _reconstruction(cfg: AptConfig, model):
    """L1 between the training images and the images decoded from the predicted latents."""
    if not cfg.reconstruction_weight:
        return None
    vae = model.vae
    factor = vae.config.scaling_factor

    def for_batch(batch):
        target = batch.pixels

        def loss(latents: torch.Tensor) -> torch.Tensor:
            decoded = vae.decode((latents / factor).to(vae.dtype)).sample.float()
            return cfg.reconstruction_weight * F.l1_loss(decoded, target.to(decoded.device))
        return loss
    return for_batch


def _previews(cfg: AptConfig, name: str):
    """The preview prompt with the positive embedding, and as negative prompt the same text
    with '<name>-neg' (DreamArtist's previews), plus any negative prompt given."""
    def settings(step: int, texts: list[str]) -> list[PreviewSettings]:
        prompt = cfg.preview_prompt or (texts[0] if texts else name)
        negative = pair_negative(prompt, name, cfg.preview_negative)
        return [PreviewSettings(prompt=prompt, negative=negative, seed=cfg.preview_seed,
                                steps=cfg.preview_steps, cfg=cfg.preview_cfg,
                                sampler=cfg.preview_sampler, width=cfg.width, height=cfg.height)]
    return settings
