"""A small stand-in for `torchvision.transforms`, only what diffusers' SD training examples use.

No torchvision build exists for this torch (2.13, CPU), and the example scripts import
`from torchvision import transforms` at the top. `write_standin(folder)` writes a package named
`torchvision` into `folder` (put on the scripts' PYTHONPATH only, never installed) whose
`transforms` is this file. It implements torchvision's semantics for PIL images and CHW tensors:
Compose, Resize (int = shorter side), CenterCrop, RandomCrop, RandomHorizontalFlip, ToTensor,
Normalize, Lambda, InterpolationMode and `transforms.functional` (resize, crop, center_crop,
hflip, to_tensor, normalize). It has no distribution metadata, so diffusers' and transformers'
`is_torchvision_available()` stay False and no library code path changes.

This module imports only torch, numpy and PIL, so it is importable (and testable) as
`bench.torchvision_standin` too.
"""
from __future__ import annotations

import enum
import numbers
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["Compose", "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip", "ToTensor",
           "Normalize", "Lambda", "InterpolationMode", "resize", "crop", "center_crop", "hflip",
           "to_tensor", "normalize", "functional"]


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL_MODES = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.NEAREST_EXACT: Image.NEAREST,
              InterpolationMode.BILINEAR: Image.BILINEAR, InterpolationMode.BICUBIC: Image.BICUBIC,
              InterpolationMode.BOX: Image.BOX, InterpolationMode.HAMMING: Image.HAMMING,
              InterpolationMode.LANCZOS: Image.LANCZOS}


def _size_of(img) -> tuple[int, int]:
    """(width, height) of a PIL image or a [..., H, W] tensor."""
    if isinstance(img, Image.Image):
        return img.size
    return int(img.shape[-1]), int(img.shape[-2])


def _pair(size) -> tuple[int, int]:
    """(height, width) from an int or a sequence, as torchvision reads crop sizes."""
    if isinstance(size, numbers.Number):
        return int(size), int(size)
    if len(size) == 1:
        return int(size[0]), int(size[0])
    return int(size[0]), int(size[1])


def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    """int size: the shorter side becomes `size` (aspect kept); (h, w): exactly that size."""
    if isinstance(interpolation, int):  # a PIL constant
        pil_mode = interpolation
        interpolation = next((k for k, v in _PIL_MODES.items() if v == pil_mode),
                             InterpolationMode.BILINEAR)
    width, height = _size_of(img)
    if isinstance(size, numbers.Number) or len(size) == 1:
        short = int(size if isinstance(size, numbers.Number) else size[0])
        if width <= height:
            new_w, new_h = short, int(short * height / width)
        else:
            new_h, new_w = short, int(short * width / height)
        if max_size is not None and max(new_w, new_h) > max_size:
            scale = max_size / max(new_w, new_h)
            new_w, new_h = int(new_w * scale), int(new_h * scale)
    else:
        new_h, new_w = int(size[0]), int(size[1])
    if isinstance(img, Image.Image):
        if (new_w, new_h) == img.size:
            return img
        return img.resize((new_w, new_h), _PIL_MODES[interpolation])
    mode = {InterpolationMode.NEAREST_EXACT: "nearest-exact",
            InterpolationMode.NEAREST: "nearest"}.get(interpolation,
                                                      interpolation.value if interpolation in (
                                                          InterpolationMode.BILINEAR,
                                                          InterpolationMode.BICUBIC) else "bilinear")
    batched = img if img.dim() == 4 else img[None]
    kwargs = {} if mode.startswith("nearest") else {"align_corners": False, "antialias": antialias}
    out = torch.nn.functional.interpolate(batched.float(), size=(new_h, new_w), mode=mode, **kwargs)
    out = out.to(img.dtype) if img.dtype.is_floating_point else out.round().to(img.dtype)
    return out if img.dim() == 4 else out[0]


def crop(img, top: int, left: int, height: int, width: int):
    if isinstance(img, Image.Image):
        return img.crop((left, top, left + width, top + height))
    return img[..., top:top + height, left:left + width]


def center_crop(img, output_size):
    crop_h, crop_w = _pair(output_size)
    width, height = _size_of(img)
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return crop(img, top, left, crop_h, crop_w)


def hflip(img):
    if isinstance(img, Image.Image):
        return img.transpose(Image.FLIP_LEFT_RIGHT)
    return img.flip(-1)


def to_tensor(pic) -> torch.Tensor:
    """PIL image or HWC uint8 array -> float CHW tensor in [0, 1]."""
    if isinstance(pic, Image.Image):
        if pic.mode == "I;16":
            array = np.array(pic, dtype=np.int32)
        else:
            array = np.array(pic)
    else:
        array = np.asarray(pic)
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if tensor.dtype == torch.uint8:
        return tensor.float().div(255)
    return tensor.float()


def normalize(tensor: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    if not inplace:
        tensor = tensor.clone()
    return tensor.sub_(mean).div_(std)


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        for transform in self.transforms:
            img = transform(img)
        return img


class Lambda:
    def __init__(self, lambd):
        self.lambd = lambd

    def __call__(self, img):
        return self.lambd(img)


class Resize(torch.nn.Module):
    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, max_size=None,
                 antialias=True):
        super().__init__()
        self.size, self.interpolation = size, interpolation
        self.max_size, self.antialias = max_size, antialias

    def forward(self, img):
        return resize(img, self.size, self.interpolation, self.max_size, self.antialias)


class CenterCrop(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = _pair(size)

    def forward(self, img):
        return center_crop(img, self.size)


class RandomCrop(torch.nn.Module):
    """A random crop of `size` (no padding options: the scripts never pad)."""

    def __init__(self, size, padding=None, pad_if_needed=False, fill=0, padding_mode="constant"):
        super().__init__()
        if padding or pad_if_needed:
            raise NotImplementedError("the torchvision stand-in does not pad")
        self.size = _pair(size)

    @staticmethod
    def get_params(img, output_size) -> tuple[int, int, int, int]:
        width, height = _size_of(img)
        th, tw = _pair(output_size)
        if height < th or width < tw:
            raise ValueError(f"crop size {(th, tw)} is larger than the image {(height, width)}")
        if (width, height) == (tw, th):
            return 0, 0, height, width
        top = int(torch.randint(0, height - th + 1, size=(1,)).item())
        left = int(torch.randint(0, width - tw + 1, size=(1,)).item())
        return top, left, th, tw

    def forward(self, img):
        top, left, height, width = self.get_params(img, self.size)
        return crop(img, top, left, height, width)


class RandomHorizontalFlip(torch.nn.Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def forward(self, img):
        if torch.rand(1) < self.p:
            return hflip(img)
        return img


class ToTensor:
    def __call__(self, pic):
        return to_tensor(pic)


class Normalize(torch.nn.Module):
    def __init__(self, mean, std, inplace: bool = False):
        super().__init__()
        self.mean, self.std, self.inplace = mean, std, inplace

    def forward(self, tensor):
        return normalize(tensor, self.mean, self.std, self.inplace)


class _Functional:
    """`transforms.functional` when this file is used as `bench.torchvision_standin`."""
    InterpolationMode = InterpolationMode
    resize = staticmethod(resize)
    crop = staticmethod(crop)
    center_crop = staticmethod(center_crop)
    hflip = staticmethod(hflip)
    to_tensor = staticmethod(to_tensor)
    normalize = staticmethod(normalize)


functional = _Functional()

_PACKAGE_INIT = '''"""Danlu benchmark stand-in for torchvision (transforms only); not the real package."""
__version__ = "0.0+danlu.bench.standin"
from . import transforms  # noqa: F401
'''

_FUNCTIONAL = '''"""torchvision.transforms.functional, as far as the stand-in goes."""
from torchvision.transforms import (InterpolationMode, center_crop, crop, hflip,  # noqa: F401
                                    normalize, resize, to_tensor)
'''


def write_standin(folder: Path) -> Path:
    """Write the `torchvision` stand-in package into `folder`; returns `folder` (for PYTHONPATH)."""
    folder = Path(folder)
    package = folder / "torchvision"
    (package / "transforms").mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(_PACKAGE_INIT, encoding="utf-8")
    source = Path(__file__).read_text(encoding="utf-8")
    # inside the package, `functional` is a real submodule, not the _Functional object
    source = source.replace("\nfunctional = _Functional()\n", "\n")
    (package / "transforms" / "__init__.py").write_text(
        source + "\nfrom torchvision.transforms import functional  # noqa: E402,F401\n",
        encoding="utf-8")
    (package / "transforms" / "functional.py").write_text(_FUNCTIONAL, encoding="utf-8")
    return folder
