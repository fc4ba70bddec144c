"""Training images -> cached latents, and batches drawn by micro-step index.

Latents are encoded once up front (as A1111's 'once' / 'deterministic' latent sampling does);
'random' keeps each image's latent distribution and samples it per step."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from core.images import BOMB_PIXELS, ImageError, describe_skipped, open_image, scan_folder
from trainers import seeds
from trainers.captions import filewords_for
from trainers.masks import MaskError, as_weights, find_masks, open_mask, to_latent


class DatasetError(ValueError):
    pass


@dataclass
class Example:
    path: Path
    filewords: str
    mean: torch.Tensor  # scaled latent mean [4, h, w]
    std: torch.Tensor | None  # scaled latent std, kept only for 'random' sampling
    latent: torch.Tensor  # the latent used when sampling is 'once' or 'deterministic'
    weight: torch.Tensor | None = None  # [1, h, w] loss weight: alpha channel or mask
    pixels: torch.Tensor | None = None  # [3, H, W] in [-1, 1], kept for a reconstruction loss


@dataclass
class Dataset:
    examples: list[Example]
    batch_size: int
    seed: int
    latent_sampling: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    held_out: list[Example] = field(default_factory=list)  # validation images, never trained

    @property
    def batches_per_epoch(self) -> int:
        return len(self.examples) // self.batch_size

    def indices(self, micro: int) -> list[int]:
        epoch, within = divmod(micro, self.batches_per_epoch)
        order = torch.randperm(len(self.examples), generator=seeds.generator(self.seed, "order", epoch))
        return order[within * self.batch_size:(within + 1) * self.batch_size].tolist()

    def latents(self, micro: int, chosen: list[int]) -> torch.Tensor:
        out = []
        for index in chosen:
            example = self.examples[index]
            if self.latent_sampling == "random":
                noise = torch.randn(example.mean.shape, generator=seeds.generator(self.seed, "latent", micro, index))
                out.append(example.mean + example.std * noise)
            else:
                out.append(example.latent)
        return torch.stack(out)

    def weights(self, chosen: list[int]) -> torch.Tensor | None:
        if self.examples[chosen[0]].weight is None:
            return None
        return torch.stack([self.examples[i].weight for i in chosen])

    def pixels(self, chosen: list[int]) -> torch.Tensor | None:
        if self.examples[chosen[0]].pixels is None:
            return None
        return torch.stack([self.examples[i].pixels for i in chosen])


def open_training_image(path: Path, keep_alpha: bool) -> Image.Image:
    """An upright training image: RGBA with keep_alpha (alpha 255 where the file has none), else
    RGB with any transparency over white. Raises core.images.ImageError naming the problem."""
    # Pillow's own refusal limit, as the trainers have always used (preprocessing is stricter)
    return open_image(path, max_pixels=BOMB_PIXELS, alpha="rgba" if keep_alpha else "flatten")


def load_dataset(folder: Path, vae, width: int, height: int, *, varsize: bool, batch_size: int,
                 seed: int, latent_sampling: str, use_weight: bool, word_regex: str = "",
                 join_string: str = " ", report: Callable[[str], None] = lambda text: None,
                 keep_pixels: bool = False, mask_dir: Path | None = None,
                 alpha_mask: bool = False) -> Dataset:
    """`use_weight`: A1111's alpha-channel loss weight (normalised to mean 1); `mask_dir` /
    `alpha_mask`: kohya's masked loss from mask files or the alpha channel (trainers/masks.py)."""
    if not folder.exists():
        raise DatasetError(f"data_root: {folder} does not exist")
    if not folder.is_dir():
        raise DatasetError(f"data_root: {folder} is not a folder")
    scan = scan_folder(folder)
    files = scan.images
    try:
        masks = find_masks(files, mask_dir) if mask_dir is not None else {}
    except MaskError as error:
        raise DatasetError(str(error)) from None
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    factor = vae.config.scaling_factor
    examples, skipped = [], list(scan.skipped)
    for number, path in enumerate(files, 1):
        try:
            image = open_training_image(path, keep_alpha=use_weight or alpha_mask)
        except ImageError as error:
            skipped.append((path.name, str(error)[:200]))
            continue
        try:
            mask = open_mask(masks[path], image.size) if path in masks else None
        except MaskError as error:
            raise DatasetError(f"conditioning_data_dir: {error}") from None
        if alpha_mask:
            mask = image.getchannel("A")
        if not varsize:
            image = image.resize((width, height), Image.BICUBIC)
            mask = mask.resize((width, height), Image.BICUBIC) if mask is not None else None
        else:
            w, h = (image.width // scale) * scale, (image.height // scale) * scale
            if w == 0 or h == 0:
                skipped.append((path.name, f"smaller than {scale} px"))
                continue
            image = image.crop((0, 0, w, h))
            mask = mask.crop((0, 0, w, h)) if mask is not None else None
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(array[..., :3].copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        mean = (dist.mean[0] * factor).float().cpu()
        std = (dist.std[0] * factor).float().cpu()
        if latent_sampling == "deterministic":
            latent = mean
        else:
            noise = torch.randn(mean.shape, generator=seeds.generator(seed, "once", path.name))
            latent = mean + std * noise
        weight = None
        if use_weight:
            alpha = image.getchannel("A").resize((mean.shape[2], mean.shape[1]), Image.BICUBIC)
            weight = torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)[None]
            weight = weight / weight.mean().clamp(min=1e-6)
        if mask is not None:
            weight = to_latent(as_weights(mask), mean.shape[1:])
        examples.append(Example(path=path, filewords=filewords_for(path, word_regex, join_string),
                                mean=mean, std=std if latent_sampling == "random" else None,
                                latent=latent, weight=weight,
                                pixels=pixels[0].float().cpu() if keep_pixels else None))
        report(f"Preparing dataset: {number}/{len(files)} images")
    if not examples:
        detail = f" ({describe_skipped(skipped)})" if skipped else ""
        raise DatasetError(f"data_root: no usable images in {folder}{detail}")
    if len(examples) < batch_size:
        raise DatasetError(f"batch_size: {batch_size} is larger than the {len(examples)} "
                           f"usable images in {folder}")
    return Dataset(examples, batch_size, seed, latent_sampling, skipped)
