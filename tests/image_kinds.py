"""Awkward image files made in the tests, each with the upright RGB picture it must become.

Every writer saves one file into a folder and returns `expected(background)`: the RGB array
(height x width x 3, uint8) the file must open as when transparency is laid over `background`."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64
RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (40, 40, 40)


def _ramp16() -> np.ndarray:
    return np.linspace(0, 65535, SIZE).round().astype(np.uint16)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2).astype(np.uint8)


def _halves(left, right, height=SIZE, width=SIZE) -> np.ndarray:
    out = np.empty((height, width, 3), np.uint8)
    out[:, :width // 2] = left
    out[:, width // 2:] = right
    return out


def deep16_png(folder: Path):
    """16-bit greyscale PNG (Pillow: I;16), a left-to-right ramp over the whole 16-bit range."""
    ramp = np.tile(_ramp16(), (SIZE, 1))
    Image.fromarray(ramp).save(folder / "deep16.png")
    return lambda background: _grey(np.rint(ramp / 257.0))


def deep16_big_endian_tif(folder: Path):
    """16-bit big-endian greyscale TIFF (I;16B), a top-to-bottom ramp."""
    ramp = np.tile(_ramp16()[:, None], (1, SIZE)).astype(">u2")
    image = Image.frombuffer("I;16B", (SIZE, SIZE), ramp.tobytes(), "raw", "I;16B", 0, 1)
    image.save(folder / "deep16b.tif")
    assert Image.open(folder / "deep16b.tif").mode == "I;16B"
    return lambda background: _grey(np.rint(ramp.astype(np.float64) / 257.0))


def int32_tif(folder: Path):
    """32-bit integer greyscale TIFF (mode I) holding 16-bit values."""
    ramp = np.tile(_ramp16().astype(np.int32), (SIZE, 1))
    Image.fromarray(ramp).save(folder / "int32.tif")
    assert Image.open(folder / "int32.tif").mode == "I"
    return lambda background: _grey(np.rint(ramp / 257.0))


def _png16(path: Path, array: np.ndarray, colour_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    height, width = array.shape[:2]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def rgb16_png(folder: Path):
    """16-bit RGB PNG: red rises left to right, green falls, blue is half."""
    ramp = np.tile(_ramp16(), (SIZE, 1))
    array = np.stack([ramp, 65535 - ramp, np.full_like(ramp, 32768)], axis=-1)
    _png16(folder / "rgb16.png", array, 2)
    return lambda background: np.rint(array / 257.0).astype(np.uint8)


def cmyk_tif(folder: Path):
    """CMYK TIFF with pure cyan, magenta, yellow and black quadrants."""
    array = np.zeros((SIZE, SIZE, 4), np.uint8)
    half = SIZE // 2
    array[:half, :half, 0] = 255  # cyan
    array[:half, half:, 1] = 255  # magenta
    array[half:, :half, 2] = 255  # yellow
    array[half:, half:, 3] = 255  # black
    Image.fromarray(array, "CMYK").save(folder / "cmyk.tif")
    expected = np.zeros((SIZE, SIZE, 3), np.uint8)
    expected[:half, :half] = (0, 255, 255)
    expected[:half, half:] = (255, 0, 255)
    expected[half:, :half] = (255, 255, 0)
    return lambda background: expected


def rotated_png(folder: Path):
    """Stored 96 wide x 64 tall, left red / right blue, with EXIF orientation 6 (shown rotated
    90 degrees clockwise): upright it is 64 wide x 96 tall, red on top."""
    stored = Image.fromarray(_halves(RED, BLUE, height=SIZE, width=96))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "rotated.png", exif=exif.tobytes())
    upright = np.empty((96, SIZE, 3), np.uint8)
    upright[:48], upright[48:] = RED, BLUE
    return lambda background: upright


def animated_gif(folder: Path):
    """Two frames, red then blue: the first frame is the picture."""
    frames = [Image.new("RGB", (SIZE, SIZE), RED), Image.new("RGB", (SIZE, SIZE), BLUE)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(folder / "anim.gif").n_frames == 2
    return lambda background: np.full((SIZE, SIZE, 3), RED, np.uint8)


def palette_png(folder: Path):
    """Palette image whose index 0 (black, left half) is transparent; index 1 is red."""
    image = Image.new("P", (SIZE, SIZE), 1)
    image.putpalette([0, 0, 0, *RED] + [0] * 762)
    image.paste(0, (0, 0, SIZE // 2, SIZE))
    image.save(folder / "palette.png", transparency=0)
    return lambda background: _halves(background, RED)


def rgba_png(folder: Path):
    """RGBA: left half blue under alpha 0, right half opaque red."""
    array = np.zeros((SIZE, SIZE, 4), np.uint8)
    array[..., :3] = _halves(BLUE, RED)
    array[:, SIZE // 2:, 3] = 255
    Image.fromarray(array, "RGBA").save(folder / "rgba.png")
    return lambda background: _halves(background, RED)


def grey_alpha_png(folder: Path):
    """Grey + alpha (LA): left half transparent, right half opaque grey 40."""
    alpha = np.zeros((SIZE, SIZE), np.uint8)
    alpha[:, SIZE // 2:] = 255
    grey = Image.new("L", (SIZE, SIZE), GREY[0])
    Image.merge("LA", (grey, Image.fromarray(alpha))).save(folder / "la.png")
    return lambda background: _halves(background, GREY)


KINDS = {"deep16.png": deep16_png, "deep16b.tif": deep16_big_endian_tif, "int32.tif": int32_tif,
         "rgb16.png": rgb16_png, "cmyk.tif": cmyk_tif, "rotated.png": rotated_png,
         "anim.gif": animated_gif, "palette.png": palette_png, "rgba.png": rgba_png,
         "la.png": grey_alpha_png}
TRANSPARENT = {"palette.png", "rgba.png", "la.png"}


def write_all(folder: Path) -> dict:
    """Every kind into `folder`: {file name: expected(background)}."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: writer(folder) for name, writer in KINDS.items()}
