"""Aesthetic embeddings and aesthetic-gradient steering (A1111's aesthetic-gradients extension).

The embedding: the mean of the CLIP image embeddings (`get_image_features`, the projected
pooled output of the vision tower) of a folder of images, normalized to unit length, saved as
a plain float32 tensor of shape [1, projection_dim] with torch.save in `models/aesthetic_embeddings/
<name>.pt` (the extension torch.loads such a tensor and normalizes it again; the legacy
serialization keeps A1111's safe unpickler happy).

The CLIP model comes from a local folder (no hub): a full CLIPModel (vision + text, e.g.
openai/clip-vit-large-patch14, which the extension uses) or a CLIPVisionModelWithProjection;
images are prepared by the folder's CLIP image processor (preprocessor_config.json), or with
CLIP's standard resize / centre crop / normalization at the vision tower's image size.

Steering (the extension's semantics): for each prompt, a copy of the CLIP text tower is
fine-tuned for `steps` Adam steps at `lr` to raise the cosine similarity between the prompt's
projected text embedding and the aesthetic embedding; the copy's hidden states (clip skip
honoured) are mixed into the prompt's conditioning, `z * (1 - weight) + z_steered * weight`.
That needs the text tower (a CLIPModel) whose width matches the Stable Diffusion text encoder's
(true of SD1 and the ViT-L/14 CLIP). Applied to every prompt encoded, negative ones included,
as the extension does.

The extension's other options, with its semantics:
- "Aesthetic text for imgs": the text's projected CLIP text embedding (from the untuned text
  tower, not normalized) is mixed into the target: target = slerp(image embedding, text
  embedding, slerp angle). "Is negative text" uses normalize(image embedding - text embedding)
  instead, steering away from the text.
- "Slerp interpolation": the final mix is slerp(z, z_steered, weight) instead of the linear one.
  The extension's slerp normalizes along dim 1, which for a [batch, tokens, width] conditioning
  is the token axis: each width channel's column of token values is one vector. Kept as is, so
  images match the extension's."""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from core.images import (BOMB_PIXELS, IMAGE_EXTENSIONS, ImageError, describe_skipped, open_image,
                         scan_folder)
from trainers.formats.safe_load import save_torch_legacy


class AestheticError(ValueError):
    def __init__(self, message: str):
        super().__init__(message)
        self.user_message = message


# ---------------------------------------------------------------------------- the CLIP model

@dataclass
class ClipModels:
    vision: torch.nn.Module  # get_image_features(pixel_values) or image_embeds
    full: torch.nn.Module | None  # the CLIPModel when the folder has the text tower too
    processor: object
    folder: Path

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.full is not None:
            out = self.full.get_image_features(pixel_values=pixel_values)
        else:
            out = self.vision(pixel_values=pixel_values).image_embeds
        return getattr(out, "pooler_output", out)  # transformers may wrap it


def _processor(folder: Path, image_size: int):
    try:
        from transformers import CLIPImageProcessorPil as Processor  # no torchvision needed
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as Processor
    if (folder / "preprocessor_config.json").is_file():
        return Processor.from_pretrained(str(folder))
    return Processor(size={"shortest_edge": image_size},
                     crop_size={"height": image_size, "width": image_size})


def load_clip(folder: Path | str) -> ClipModels:
    """A local CLIPModel or CLIPVisionModelWithProjection folder (config.json + weights)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise AestheticError(f"clip_model: {folder} is not a CLIP model folder (no config.json)")
    try:
        kind = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise AestheticError(f"clip_model: {config_path} is not readable JSON ({error})") from None
    from transformers import CLIPModel, CLIPVisionModelWithProjection
    try:
        if kind == "clip":
            full = CLIPModel.from_pretrained(str(folder), local_files_only=True)
            vision, image_size = full.vision_model, full.config.vision_config.image_size
        elif kind == "clip_vision_model":
            full = None
            vision = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
            image_size = vision.config.image_size
        else:
            raise AestheticError(f"clip_model: {folder} holds a {kind!r} model; choose a CLIP "
                                 "model (CLIPModel or CLIPVisionModelWithProjection)")
    except AestheticError:
        raise
    except Exception as error:  # missing or broken weights
        from trainers.formats.safe_load import explain_refusal
        refused = explain_refusal(error, folder)  # which file, and why; never torch's advice
        raise AestheticError(f"clip_model: could not load {folder}: "
                             f"{refused or f'{type(error).__name__}: {error}'[:400]}") from None
    for module in (full, vision):
        if module is not None:
            module.requires_grad_(False).eval()
    return ClipModels(vision=vision, full=full, processor=_processor(folder, image_size),
                      folder=folder)


# ---------------------------------------------------------------------------- the embedding

def image_embeddings(clip: ClipModels, images: list[Path], batch_size: int = 8,
                     report: Callable[[str], None] = lambda text: None) -> torch.Tensor:
    """[n, projection_dim] CLIP image embeddings (not normalized)."""
    rows = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pictures = []
        for path in chunk:
            try:  # transparency dropped, as the extension's convert("RGB") drops it
                pictures.append(open_image(path, max_pixels=BOMB_PIXELS, alpha="drop"))
            except ImageError as error:
                raise AestheticError(f"data_root: {path.name} is not a readable image ({error})") from None
        pixels = clip.processor(images=pictures, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            rows.append(clip.image_features(pixels).float())
        report(f"Embedding images: {min(start + batch_size, len(images))}/{len(images)}")
    return torch.cat(rows)


def aesthetic_embedding(features: torch.Tensor) -> torch.Tensor:
    """The normalized mean: [1, dim]."""
    mean = features.float().mean(dim=0, keepdim=True)
    return mean / mean.norm(dim=-1, keepdim=True)


def create_aesthetic_embedding(cfg, paths, report: Callable[[str], None] = lambda text: None) -> Path:
    """AestheticEmbeddingConfig -> models/aesthetic_embeddings/<name>.pt"""
    from core.paths import PathError
    cfg.validate()
    _check_paths(cfg, paths)
    target = paths.aesthetic_embeddings / f"{cfg.name.strip()}.pt"
    if target.exists() and not cfg.overwrite:
        raise AestheticError(f"name: {target.name} already exists in {target.parent}; tick "
                             "'Overwrite' or pick another name")
    try:
        folder = paths.resolve(cfg.data_root, "data_root")
        clip_folder = paths.resolve(cfg.clip_model, "clip_model")
    except PathError as error:
        raise AestheticError(str(error)) from None
    if not folder.is_dir():
        raise AestheticError(f"data_root: {folder} is not a folder")
    scan = scan_folder(folder)
    images = scan.images
    if not images:
        raise AestheticError(f"data_root: {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    if scan.skipped:
        report(describe_skipped(scan.skipped))
    clip = load_clip(clip_folder)
    embedding = aesthetic_embedding(image_embeddings(clip, images, cfg.batch_size, report))
    target.parent.mkdir(parents=True, exist_ok=True)
    save_torch_legacy(embedding.contiguous(), target)
    return target


def _check_paths(cfg, paths) -> None:
    """Every field the config marks as a path, through the one resolver (confined when shared)."""
    from core.config import ConfigError, path_problems
    problems = path_problems(cfg, paths)
    if problems:
        raise ConfigError(problems)


def load_aesthetic_embedding(path: Path | str) -> torch.Tensor:
    """[1, dim], normalized (as the extension loads it)."""
    from trainers.formats.safe_load import safe_torch_load
    value = safe_torch_load(Path(path))
    if not torch.is_tensor(value) or value.dim() != 2 or value.shape[0] != 1:
        raise AestheticError(f"aesthetic embedding {Path(path).name}: expected a [1, dim] tensor, "
                             f"got {getattr(value, 'shape', type(value).__name__)}")
    value = value.float()
    return value / value.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------- steering

def slerp(low: torch.Tensor, high: torch.Tensor, val: float) -> torch.Tensor:
    """Spherical interpolation along dim 1 (the extension's): val 0 gives `low`, 1 gives `high`;
    the magnitudes are interpolated with the angle's weights. Where the two directions agree
    (no angle) it falls back to the linear mix, which the extension would turn into NaN."""
    low_f, high_f = low.float(), high.float()
    cos = ((low_f / low_f.norm(dim=1, keepdim=True)) *
           (high_f / high_f.norm(dim=1, keepdim=True))).sum(1).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    flat = so.abs() < 1e-6
    safe = torch.where(flat, torch.ones_like(so), so)
    a = torch.where(flat, torch.full_like(so, 1.0 - val), torch.sin((1.0 - val) * omega) / safe)
    b = torch.where(flat, torch.full_like(so, float(val)), torch.sin(val * omega) / safe)
    return (a.unsqueeze(1) * low_f + b.unsqueeze(1) * high_f).to(low.dtype)


@dataclass
class Steering:
    embedding: torch.Tensor  # [1, projection_dim], normalized
    steps: int = 5
    lr: float = 1e-4
    weight: float = 0.9
    text: str = ""  # "aesthetic text for imgs": mixed into the target by slerp_angle
    text_negative: bool = False  # steer away from the text instead
    slerp: bool = False  # mix the steered conditioning in by slerp instead of linearly
    slerp_angle: float = 0.1


class SteeredEncoder:
    """A PromptEncoder whose outputs are steered toward an aesthetic embedding."""

    def __init__(self, base, clip: ClipModels, steering: Steering):
        if clip.full is None:
            raise AestheticError(f"clip_model: steering needs the CLIP text tower too; "
                                 f"{clip.folder} holds only a vision model (use a full CLIP "
                                 "model folder, e.g. clip-vit-large-patch14)")
        width = clip.full.config.text_config.hidden_size
        context = base.text_encoder.config.hidden_size
        if width != context:
            raise AestheticError(f"clip_model: its text tower is {width} wide, the model's text "
                                 f"encoder {context}; steering needs the same width (ViT-L/14 "
                                 "for SD1)")
        if clip.full.config.projection_dim != steering.embedding.shape[-1]:
            raise AestheticError(f"aesthetic embedding: {steering.embedding.shape[-1]} values, "
                                 f"this CLIP model's embeddings have "
                                 f"{clip.full.config.projection_dim}; make it with this model")
        self.base, self.clip, self.steering = base, clip, steering
        self.tokenizer, self.text_encoder = base.tokenizer, base.text_encoder
        self.seconds = 0.0  # time spent steering, for the cost shown to the user

    def encode(self, texts: list[str]) -> torch.Tensor:
        z = self.base.encode(texts)
        s = self.steering
        if not (s.steps and s.lr and s.weight):
            return z
        began = time.perf_counter()
        ids = self._ids(texts)
        steered = self._steer(ids).to(z.device, z.dtype)
        self.seconds += time.perf_counter() - began
        if s.slerp:
            return slerp(z, steered, s.weight)
        return z * (1 - s.weight) + steered * s.weight

    def _ids(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.base.tokenize(t)[0] for t in texts], dtype=torch.long)

    def target(self) -> torch.Tensor:
        """[1, projection_dim]: the aesthetic embedding, turned toward (or away from) the
        aesthetic text by the slerp angle when there is one."""
        s, image = self.steering, self.steering.embedding.float()
        if not s.text.strip():
            return image
        with torch.no_grad():
            text = self.clip.full.get_text_features(input_ids=self._ids([s.text]))
            text = getattr(text, "pooler_output", text).float()
        if s.text_negative:
            text = image - text
            text = text / text.norm(dim=-1, keepdim=True)
        return slerp(image, text, s.slerp_angle)

    def _steer(self, ids: torch.Tensor) -> torch.Tensor:
        model = copy.deepcopy(self.clip.full)
        target = self.target().to(next(model.parameters()).dtype)
        model.text_model.requires_grad_(True)
        optimizer = torch.optim.Adam(model.text_model.parameters(), lr=self.steering.lr)
        with torch.enable_grad():
            for _ in range(self.steering.steps):
                features = model.get_text_features(input_ids=ids)
                features = getattr(features, "pooler_output", features)
                features = features / features.norm(dim=-1, keepdim=True)
                loss = -(features @ target.T).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            skip = self.base.clip_skip
            out = model.text_model(input_ids=ids, output_hidden_states=skip > 1)
            if skip > 1:
                return model.text_model.final_layer_norm(out.hidden_states[-skip])
            return out.last_hidden_state


def preview(model, clip: ClipModels, embedding: torch.Tensor, settings, steps: int, lr: float,
            weight: float, clip_skip: int = 1, **options):
    """(plain image, steered image, cost line) with the same seed; `options` are Steering's
    text, text_negative, slerp and slerp_angle."""
    from trainers.prompts import PromptEncoder
    from trainers.sampling import render
    base = PromptEncoder(model.tokenizer, model.text_encoder, clip_skip=clip_skip)
    began = time.perf_counter()
    plain, seed = render(model, base, settings)
    plain_seconds = time.perf_counter() - began
    steering = Steering(embedding, steps, lr, weight, **options)
    steered_encoder = SteeredEncoder(base, clip, steering)
    began = time.perf_counter()
    steered, _ = render(model, steered_encoder, settings.__class__(**{**settings.__dict__, "seed": seed}))
    total = time.perf_counter() - began
    how = ", slerp" if steering.slerp else ""
    if steering.text.strip():
        how += (f", {'away from' if steering.text_negative else 'toward'} text "
                f"{steering.text.strip()!r} at angle {steering.slerp_angle:g}")
    cost = (f"Aesthetic steering: {steps} steps at lr {lr:g}, weight {weight:g}{how}, cost "
            f"{steered_encoder.seconds:.2f} s (the image took {total:.2f} s with it, "
            f"{plain_seconds:.2f} s without), seed {seed}")
    return plain, steered, cost


def preview_from_config(cfg, paths) -> tuple[Path, Path, str]:
    """AestheticPreviewConfig -> (plain image, steered image, cost line); the images go to
    outputs/aesthetic/<embedding>-<seed>-<n>-{plain,steered}.png, n the next free number (an
    earlier preview is never replaced)."""
    from core.paths import PathError
    from trainers.aesthetic_files import find_aesthetic_embedding
    from trainers.models import load_model
    from trainers.sampling import PreviewSettings
    cfg.validate()
    _check_paths(cfg, paths)
    try:
        source = find_aesthetic_embedding(paths, cfg.aesthetic_embedding)
        clip_folder = paths.resolve(cfg.clip_model, "clip_model")
    except (PathError, FileNotFoundError) as error:
        raise AestheticError(str(error)) from None
    embedding = load_aesthetic_embedding(source)
    clip = load_clip(clip_folder)
    model = load_model(paths, cfg.model)
    settings = PreviewSettings(prompt=cfg.prompt, negative=cfg.negative, seed=cfg.seed,
                               steps=cfg.steps, cfg=cfg.cfg_scale, sampler=cfg.sampler,
                               width=cfg.width, height=cfg.height)
    plain, steered, cost = preview(model, clip, embedding, settings, cfg.aesthetic_steps,
                                   cfg.aesthetic_lr, cfg.aesthetic_weight, cfg.clip_skip,
                                   text=cfg.aesthetic_text,
                                   text_negative=cfg.aesthetic_text_negative,
                                   slerp=cfg.aesthetic_slerp,
                                   slerp_angle=cfg.aesthetic_slerp_angle)
    folder = paths.outputs / "aesthetic"
    folder.mkdir(parents=True, exist_ok=True)
    number = 1
    while (folder / f"{source.stem}-{cfg.seed}-{number:04}-plain.png").exists():
        number += 1
    stem = f"{source.stem}-{cfg.seed}-{number:04}"
    plain_path, steered_path = folder / f"{stem}-plain.png", folder / f"{stem}-steered.png"
    plain.save(plain_path)
    steered.save(steered_path)
    return plain_path, steered_path, cost
