"""The one image opener and the one list of image types, for preprocessing and every trainer.

`open_image` applies the EXIF orientation, takes the first frame of an animation, refuses
decompression-bomb sizes before decoding, and converts every Pillow mode properly: CMYK, palette
(with or without transparency), grey+alpha, 16-bit and float images (16-bit values are scaled
down, not clipped to white). Transparency is composited over a background colour, kept, or
dropped, as the caller asks.

`scan_folder` lists a folder's images and names every other file in it that is not a companion
of an image (its caption, tags or latent cache), so a run can say which files it did not use."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Every file type Danlu treats as an image, in every tab and trainer (compared lower-cased).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                    ".avif")
WARNING_PIXELS = 89_478_485  # Pillow's own decompression-bomb warning limit
BOMB_PIXELS = 2 * WARNING_PIXELS  # where Pillow refuses to open an image at all
ALPHA_MODES = ("flatten", "keep", "rgba", "drop")
_TRANSPARENT_MODES = {"RGBA", "LA", "La", "PA", "RGBa"}


class ImageError(ValueError):
    """A file that cannot be used as an image; the message says why."""


def is_image_file(path: Path) -> bool:
    """A regular, not hidden file whose name ends in one of IMAGE_EXTENSIONS."""
    return (path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
            and path.is_file())


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """The folder's image files, sorted by name (by path when recursive)."""
    folder = Path(folder)
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted((p for p in found if is_image_file(p)), key=lambda p: p.name if not recursive
                  else str(p))


@dataclass
class FolderScan:
    images: list[Path]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)


def scan_folder(folder: str | Path) -> FolderScan:
    """A folder's images (sorted by name), and every other visible file that is not a companion
    of one of them (a file with an image's stem, such as its `.txt` caption or `.npz` cache)."""
    folder = Path(folder)
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: p.name)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    stems = {p.stem for p in images}
    skipped = [(p.name, not_an_image_reason(p)) for p in files
               if p.suffix.lower() not in IMAGE_EXTENSIONS and p.stem not in stems]
    return FolderScan(images, skipped)


def not_an_image_reason(path: Path) -> str:
    if path.suffix.lower() in (".txt", ".caption"):
        return "a caption file with no image of the same name"
    kind = f"{path.suffix} files" if path.suffix else "files without an extension"
    return f"not an image type ({kind} are not read; images are {', '.join(IMAGE_EXTENSIONS)})"


def describe_skipped(skipped: list[tuple[str, str]], limit: int = 10) -> str:
    """'Skipped 3 files: a.psd (why); b.png (why)', naming at most `limit` of them."""
    listed = "; ".join(f"{name} ({why})" for name, why in skipped[:limit])
    more = f"; ... and {len(skipped) - limit} more" if len(skipped) > limit else ""
    noun = "file" if len(skipped) == 1 else "files"
    return f"Skipped {len(skipped)} {noun}: {listed}{more}"


def open_image(path: str | Path, max_pixels: int = WARNING_PIXELS, alpha: str = "flatten",
               background: tuple[int, int, int] = (255, 255, 255),
               draft: tuple[int, int] | None = None) -> Image.Image:
    """Read `path` fully into memory as an upright image. Raises ImageError with a short reason.

    alpha: "flatten" composites transparency over `background` (RGB); "keep" gives RGBA when
    the image is transparent, else RGB; "rgba" always gives RGBA (opaque images get alpha 255);
    "drop" discards transparency, keeping the colours stored under it (RGB). `draft` lets a
    JPEG decode at a reduced scale no smaller than that size (for thumbnails)."""
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha: {alpha!r} is not one of {', '.join(ALPHA_MODES)}")
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
                if draft is not None:
                    im.draft("RGB", draft)
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
    return image.mode in _TRANSPARENT_MODES or "transparency" in image.info


def to_rgb(image: Image.Image, alpha: str = "flatten",
           background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to RGB (or RGBA, see open_image's `alpha`)."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_depth_to_l(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        if alpha == "rgba":
            return rgba
        if alpha == "keep":
            if rgba.getchannel("A").getextrema() == (255, 255):
                return rgba.convert("RGB")
            return rgba
        if alpha == "drop":
            return rgba.convert("RGB")
        return flatten(rgba, background)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb.convert("RGBA") if alpha == "rgba" else rgb


def flatten(rgba: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Composite an RGBA image over a solid background colour."""
    if rgba.mode != "RGBA":
        rgba = rgba.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
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
