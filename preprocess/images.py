"""Open any image a user may drop into a dataset folder, or say clearly why not.

`open_image` applies the EXIF orientation, takes the first frame of an animation, refuses
decompression-bomb sizes before decoding, and returns RGB (or RGBA when the alpha channel is to
be kept): CMYK, palette, grey+alpha, 16-bit and float images are converted properly (16-bit
values are scaled down, not clipped to white)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from preprocess.config import PIL_MAX_PIXELS

_ALPHA_MODES = {"RGBA", "LA", "La", "PA", "RGBa"}


class ImageError(ValueError):
    """A file that cannot be used as an image; the message says why."""


def open_image(path: str | Path, max_pixels: int = PIL_MAX_PIXELS, alpha: str = "white",
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Read `path` fully into memory as an upright RGB image (RGBA if alpha == "keep" and the
    image has transparency). Raises ImageError with a short reason."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageError(_too_big(width, height, max_pixels))
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                im.load()
                image = _upright(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"refused: {error}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image, or a format Pillow cannot read") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        raise ImageError(f"unreadable image ({type(error).__name__}: {error})") from None
    try:
        return to_rgb(image, alpha=alpha, background=background)
    except (OSError, ValueError) as error:
        raise ImageError(f"cannot convert {image.mode} image to RGB ({error})") from None


def _too_big(width: int, height: int, limit: int) -> str:
    return (f"refused: {width}x{height} is {width * height / 1e6:.1f} megapixels, more than "
            f"the limit of {limit / 1e6:.1f} (decompression-bomb guard; raise max_pixels "
            "if the image is genuine)")


def _upright(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored."""
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception:  # malformed EXIF must not lose the image
        upright = None
    if upright is None:
        upright = im.copy()
    upright.info = dict(im.info)
    return upright


def has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def to_rgb(image: Image.Image, alpha: str = "white",
           background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to RGB, or to RGBA when alpha == "keep" and it is transparent."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_depth_to_l(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        if alpha == "keep":
            if rgba.getchannel("A").getextrema() == (255, 255):
                return rgba.convert("RGB")
            return rgba
        return flatten(rgba, background)
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def flatten(rgba: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Composite an RGBA image over a solid background colour."""
    if rgba.mode != "RGBA":
        rgba = rgba.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit L, scaled rather than clipped."""
    array = np.asarray(image)
    if image.mode == "F":
        array = array.astype(np.float64)
        finite = array[np.isfinite(array)]
        top = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if top <= 1.0 else (1.0 if top <= 255.0 else 255.0 / top)
        out = np.nan_to_num(array * scale, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        array = array.astype(np.int64)
        top = int(array.max()) if array.size else 0
        if image.mode.startswith("I;16") or 255 < top <= 65535:
            out = array / 257.0
        elif top > 65535:
            out = array * (255.0 / top)
        else:
            out = array.astype(np.float64)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "L")
