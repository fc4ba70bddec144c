"""A1111's embedding-in-an-image format, both copies of the data it carries.

1. A tEXt chunk `sd-ti-embedding`: base64 of the JSON of the embedding dict, each tensor as
   {"TORCHTENSOR": nested lists}.
2. The pixels, which survive a re-save that drops text chunks (lossless formats only): the same
   JSON, zlib-compressed; low nibbles painted as a block left of the preview and high nibbles
   as a block right of it, each block 1 px of black away from the preview. A block is H rows
   by W columns by 3 channels filled row-major (byte i -> row i // (3W), column i // 3 % W,
   channel i % 3), padded by repeating the data. The nibble lives in the low 4 bits of each
   channel XOR-ed with the low nibble of an LCG keystream restarted at seed 0 for each block;
   the high 4 bits only draw a decorative dot pattern and are ignored when reading.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from core.atomic import atomic_write
from trainers.formats.embedding import (EmbeddingFile, EmbeddingFormatError, SDXL_KEYS,
                                        embedding_from_dict, to_a1111_dict)

TEXT_KEY = "sd-ti-embedding"
TENSOR_KEY = "TORCHTENSOR"
CHANNELS = 3


def save_png_embedding(path: str | Path, preview: Image.Image, emb: EmbeddingFile,
                       caption: str = "") -> None:
    """Write `preview` with the embedding in side columns (and, for .png, a tEXt chunk).

    A non-empty caption is drawn as A1111 does: the caption as a title at the top, and a footer
    with the base model name, its [hash] and "<n>v <step>s". `.webp` is saved lossless, with
    the pixel copy only (WebP has no text chunks).
    """
    path = Path(path)
    data = to_a1111_dict(emb)
    image = preview.convert("RGB")
    if caption:
        image = _caption(image, caption, emb)
    image = embed_in_pixels(image, data)
    if path.suffix.lower() == ".webp":
        atomic_write(path, lambda temp: image.save(temp, format="WEBP", lossless=True, quality=100))
        return
    info = PngImagePlugin.PngInfo()
    info.add_text(TEXT_KEY, base64.b64encode(encode_json(data)).decode("ascii"))
    atomic_write(path, lambda temp: image.save(temp, format="PNG", pnginfo=info))


def read_png_embedding(path: str | Path) -> EmbeddingFile:
    """Read the tEXt chunk, or when it is missing (a re-encoded image) the pixel columns."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            text = dict(getattr(image, "text", None) or {})
            problems: list[str] = []
            if TEXT_KEY not in text:
                problems.append(f"no {TEXT_KEY} text chunk")
            else:
                try:
                    return _from_json(base64.b64decode(text[TEXT_KEY], validate=True), path)
                except (binascii.Error, ValueError) as error:
                    problems.append(f"its {TEXT_KEY} text chunk is unreadable ({error})")
            raw = extract_pixel_data(image)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:  # PIL: broken file
        raise EmbeddingFormatError(f"{path.name}: not a readable image: {error}") from None
    if raw is None:
        problems.append("no data in the side columns (a lossy re-encode destroys them)")
        raise EmbeddingFormatError(f"{path.name}: no embedding in this image: "
                                   + "; ".join(problems))
    return _from_json(raw, path)


def _from_json(raw: bytes, path: Path) -> EmbeddingFile:
    try:
        data = decode_json(raw)
    except ValueError as error:
        raise EmbeddingFormatError(f"{path.name}: the embedding data is not valid JSON of an "
                                   f"embedding: {error}") from None
    return embedding_from_dict(data, path)


def encode_json(data: dict[str, Any]) -> bytes:
    def tensor_to_lists(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {TENSOR_KEY: value.detach().cpu().tolist()}
        raise TypeError(f"cannot write {type(value).__name__} into an embedding image")
    return json.dumps(data, default=tensor_to_lists).encode("utf-8")


def decode_json(raw: bytes) -> Any:
    def lists_to_tensor(obj: dict[str, Any]) -> Any:
        if TENSOR_KEY in obj:
            try:
                return torch.tensor(obj[TENSOR_KEY], dtype=torch.float32)
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(f"bad {TENSOR_KEY} value: {error}") from None
        return obj
    return json.loads(raw.decode("utf-8"), object_hook=lists_to_tensor)


def lcg_bytes(count: int) -> np.ndarray:
    """The keystream: seed 0, seed = (1664525 * seed + 1013904223) mod 2**32, byte seed % 255."""
    out = np.empty(count, dtype=np.uint8)
    seed = 0
    for i in range(count):
        seed = (1664525 * seed + 1013904223) & 0xFFFFFFFF
        out[i] = seed % 255
    return out


def _block_size(length: int, height: int) -> int:
    # A1111 rounds up to a multiple of the height, then of 3 * height, always adding at least
    # one step: keep its arithmetic so both programs draw blocks of the same width.
    size = length + (height - length % height)
    return size + (height * CHANNELS - size % (height * CHANNELS))


def embed_in_pixels(image: Image.Image, data: dict[str, Any]) -> Image.Image:
    """Return `image` widened with the data blocks: [low | black | image | black | high]."""
    image = image.convert("RGB")
    width, height = image.size
    packed = np.frombuffer(zlib.compress(encode_json(data), level=9), dtype=np.uint8)
    size = _block_size(len(packed), height)
    shape = (height, size // (height * CHANNELS), CHANNELS)
    keystream = lcg_bytes(size).reshape(shape) & 0x0F
    shades = _dot_shades(data)
    low = np.resize(packed & 0x0F, size).reshape(shape)
    high = np.resize(packed >> 4, size).reshape(shape)
    low = low ^ _dot_pattern(shape, shades) ^ keystream
    high = high ^ _dot_pattern(shape, shades[::-1]) ^ keystream

    block_width = shape[1]
    canvas = Image.new("RGB", (width + 2 * block_width + 2, height), (0, 0, 0))
    canvas.paste(Image.fromarray(low.astype(np.uint8), "RGB"), (0, 0))
    canvas.paste(image, (block_width + 1, 0))
    canvas.paste(Image.fromarray(high.astype(np.uint8), "RGB"), (block_width + 1 + width + 1, 0))
    return canvas


def extract_pixel_data(image: Image.Image) -> bytes | None:
    """The JSON bytes painted into the side blocks, or None when there are none."""
    pixels = _crop_black_border(np.asarray(image.convert("RGB"), dtype=np.uint8)) & 0x0F
    black_columns = np.flatnonzero(pixels.sum(axis=(0, 2)) == 0)
    if len(black_columns) < 2:
        return None
    low = pixels[:, :black_columns[0]]
    high = pixels[:, black_columns[-1] + 1:]
    if low.size == 0 or low.shape != high.shape:
        return None
    keystream = lcg_bytes(low.size).reshape(low.shape) & 0x0F
    packed = (((high ^ keystream) << 4) | (low ^ keystream)).astype(np.uint8).tobytes()
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed)  # the padding after the stream is ignored
    except zlib.error:
        return None
    return raw if inflater.eof else None


def _crop_black_border(pixels: np.ndarray) -> np.ndarray:
    # a pixel counts as black unless all its channels are non-zero (as A1111 crops)
    lit = (pixels > 0).all(axis=2)
    rows, columns = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if len(rows) == 0:
        return pixels[:0, :0]
    return pixels[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]


def _dot_shades(data: dict[str, Any]) -> np.ndarray:
    """Grey levels for the dot pattern: |first vector| (up to 1024 values) scaled to 0..255."""
    if "string_to_param" in data:
        tensor = next(iter(data["string_to_param"].values()))
    else:
        tensor = data[SDXL_KEYS[0]]
    values = np.abs(tensor.detach().to("cpu", torch.float32).numpy()[0][:1024])
    peak = float(values.max()) if values.size else 0.0
    if not math.isfinite(peak) or peak == 0.0:
        return np.zeros(max(values.size, 1), dtype=np.uint8)
    return (np.nan_to_num(values / peak) * 255).astype(np.uint8)


def _dot_pattern(shape: tuple[int, int, int], shades: np.ndarray) -> np.ndarray:
    """High nibbles of staggered 6 px dots on an 8 px grid, shades taken column by column."""
    height, width, _ = shape
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    index = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            shift = 4 if row % 2 == 0 else 0
            shade = int(shades[index % len(shades)])
            index += 1
            draw.ellipse((x + shift, y, x + shift + 6, y + 6), fill=(shade, shade, shade))
    return np.asarray(canvas, dtype=np.uint8) & 0xF0


def _caption(image: Image.Image, title: str, emb: EmbeddingFile) -> Image.Image:
    """Darken the top and bottom edges and write the title and an info footer in white."""
    width, height = image.size
    fade = np.zeros(height, dtype=np.float32)
    for y in range(height):
        top = 1 - math.cos(y / height * 1.5)
        bottom = 1 - math.cos((height - y) / height * 1.65)
        fade[y] = max(top, bottom)
    shade = np.clip(fade, 0, 1)[:, None, None]
    pixels = np.asarray(image, dtype=np.float32) * (1 - shade)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")

    draw = ImageDraw.Draw(image)
    padding = max(2, width // 50)
    title_font = _fitted_font(draw, title, width * 0.75 - 4 * padding, height)
    _text(draw, (padding, padding), title, title_font, "lt")

    checkpoint_hash = f"[{emb.sd_checkpoint}]" if emb.sd_checkpoint else ""
    steps = f" {emb.step}s" if emb.step is not None else ""
    footer = [emb.sd_checkpoint_name or "", checkpoint_hash, f"{emb.num_vectors}v{steps}"]
    longest = max(footer, key=len) or " "
    font = _fitted_font(draw, longest, width / 3 - padding, height)
    bottom = height - padding
    _text(draw, (padding, bottom), footer[0], font, "ls")
    _text(draw, (width / 2, bottom), footer[1], font, "ms")
    _text(draw, (width - padding, bottom), footer[2], font, "rs")
    return image


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
          font: ImageFont.FreeTypeFont | ImageFont.ImageFont, anchor: str) -> None:
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow without FreeType: no anchors
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = xy[0] - {"l": 0, "m": (right - left) / 2, "r": right - left}[anchor[0]]
        y = xy[1] - (0 if anchor[1] == "t" else bottom)
        draw.text((x, y), text, font=font, fill=(255, 255, 255))
        return
    draw.text(xy, text, font=font, fill=(255, 255, 255), anchor=anchor)


def _fitted_font(draw: ImageDraw.ImageDraw, text: str, max_width: float,
                 image_height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    size = max(6, min(72, image_height // 8))
    font = ImageFont.load_default(size)
    text_width = draw.textlength(text or " ", font=font)
    if text_width > max_width > 0:
        font = ImageFont.load_default(max(6, int(size * max_width / text_width)))
    return font
