"""Loss masks (kohya's `masked_loss`): a mask image per training image, found by its stem in a
mask folder (kohya's `conditioning_data_dir`), or the image's own alpha channel (`alpha_mask`).

A mask is read as kohya reads it: the R channel of the RGB image (a grayscale file's gray),
255 = trained, 0 = ignored, in between a weight. It goes through the same resize, crop and flip
as its image, is area-resized to the latent size and multiplies the per-element loss before the
mean, without renormalising (kohya's apply_masked_loss)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.images import BOMB_PIXELS, ImageError, list_images, open_image


class MaskError(ValueError):
    pass


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def find_masks(images: list[Path], folder: Path, field: str = "conditioning_data_dir"
               ) -> dict[Path, Path]:
    """image -> its mask file (same stem, any image extension) in `folder`. A missing mask, an
    ambiguous one (two files of one stem) or a mask of no image is refused by name, as kohya
    refuses missing and extra conditioning images."""
    if not folder.is_dir():
        raise MaskError(f"{field}: {folder} is not a folder")
    by_stem: dict[str, list[Path]] = {}
    for path in list_images(folder):
        by_stem.setdefault(path.stem, []).append(path)
    missing = [p.name for p in images if p.stem not in by_stem]
    if missing:
        raise MaskError(f"{field}: no mask in {folder} for {len(missing)} image(s): "
                        f"{_shown(missing)} (a mask has the image's file name)")
    doubled = [p.stem for p in images if len(by_stem[p.stem]) > 1]
    if doubled:
        raise MaskError(f"{field}: more than one mask of the same name in {folder}: "
                        f"{_shown(doubled)}")
    stems = {p.stem for p in images}
    extra = [p.name for stem, found in sorted(by_stem.items()) if stem not in stems for p in found]
    if extra:
        raise MaskError(f"{field}: {len(extra)} mask(s) in {folder} belong to no training "
                        f"image: {_shown(extra)}")
    return {image: by_stem[image.stem][0] for image in images}


def open_mask(path: Path, size: tuple[int, int]) -> Image.Image:
    """The mask as an 8-bit grayscale image (its R channel, upright), which must have the
    training image's size (width, height)."""
    try:
        image = open_image(path, max_pixels=BOMB_PIXELS, alpha="flatten")
    except ImageError as error:
        raise MaskError(f"mask {path}: {error}") from None
    if image.size != tuple(size):
        raise MaskError(f"mask {path} is {image.width}x{image.height}, its image is "
                        f"{size[0]}x{size[1]}; a mask has its image's size")
    return image.getchannel("R")


def as_weights(mask: Image.Image) -> torch.Tensor:
    """An 8-bit mask (or alpha channel) as [H, W] weights in 0..1."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def to_latent(mask: torch.Tensor, size) -> torch.Tensor:
    """[H, W] pixel weights -> [1, h, w] at the latent size, averaged over each latent cell."""
    return F.interpolate(mask[None, None].float(), size=tuple(size), mode="area")[0]
