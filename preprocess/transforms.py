"""Pure image transforms of the Preprocess job (PIL + numpy, no models, no files).

- `resize_crop`: scale to cover the output and crop the centre (A1111's "crop and resize").
- `resize_fill`: scale to fit inside and fill the margins with stretched edges ("resize and fill").
- `split_boxes` / `split_image`: cut an image much longer than the output shape into evenly
  spaced, overlapping pieces.
- `focal_crop`: crop around a weighted average of face, entropy and edge (corner) points.
- `auto_size` / `auto_size_crop`: choose an output size from a grid within area and
  aspect-error bounds, then centre-crop to it.
- `mirror` / `swap_left_right`: flipped copies and their captions.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

LANCZOS = Image.Resampling.LANCZOS

# A face detector takes an RGB image and returns boxes (x, y, w, h) in its pixel coordinates.
FaceBox = tuple[float, float, float, float]
FaceDetector = Callable[[Image.Image], Sequence[FaceBox]]


# --- flips --------------------------------------------------------------------------------------

def mirror(image: Image.Image) -> Image.Image:
    return ImageOps.mirror(image)


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """Swap the words left and right (keeping their case), for the caption of a mirrored image."""
    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other
    return _LEFT_RIGHT.sub(swap, caption)


# --- plain resizes ------------------------------------------------------------------------------

def resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers width x height, then cut the overflow evenly from both sides."""
    iw, ih = image.size
    if iw * height > ih * width:  # wider than the target: trim left and right
        span = ih * width / height
        box = ((iw - span) / 2, 0.0, (iw + span) / 2, float(ih))
    else:
        span = iw * height / width
        box = (0.0, (ih - span) / 2, float(iw), (ih + span) / 2)
    return image.resize((width, height), LANCZOS, box=box)


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to fit inside width x height and fill the margins by stretching the image's edge
    rows or columns outward (what A1111 feeds DeepDanbooru)."""
    iw, ih = image.size
    scale = min(width / iw, height / ih)
    fw, fh = max(1, round(iw * scale)), max(1, round(ih * scale))
    fitted = image.resize((fw, fh), LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    left, top = (width - fw) // 2, (height - fh) // 2
    canvas.paste(fitted, (left, top))
    if fw < width:
        if left > 0:
            canvas.paste(fitted.crop((0, 0, 1, fh)).resize((left, fh)), (0, top))
        right = width - left - fw
        if right > 0:
            canvas.paste(fitted.crop((fw - 1, 0, fw, fh)).resize((right, fh)), (left + fw, top))
    if fh < height:
        if top > 0:
            canvas.paste(fitted.crop((0, 0, fw, 1)).resize((fw, top)), (left, 0))
        bottom = height - top - fh
        if bottom > 0:
            canvas.paste(fitted.crop((0, fh - 1, fw, fh)).resize((fw, bottom)), (left, top + fh))
    return canvas


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Cut the largest centred region with the aspect of width x height and scale it to that size
    (fractional crop box, so no pixel of drift)."""
    return resize_crop(image, width, height)


# --- split oversized images ---------------------------------------------------------------------

def split_ratio(size: tuple[int, int], width: int, height: int) -> float:
    """How much longer the image is than the output shape, as a ratio <= 1 along its long axis:
    tall images compare widths-per-height, wide (and square) ones heights-per-width."""
    iw, ih = size
    if ih > iw:
        return (iw * height) / (ih * width)
    return (ih * width) / (iw * height)


@dataclass(frozen=True)
class SplitPlan:
    resized: tuple[int, int]          # the image is first scaled to this size
    boxes: list[tuple[int, int, int, int]]  # then cut into these width x height pieces


def split_boxes(size: tuple[int, int], width: int, height: int, threshold: float = 0.5,
                overlap: float = 0.2) -> SplitPlan | None:
    """Plan the pieces of an oversized image, or None when it does not need splitting.

    An image is split when split_ratio() < 1 and <= threshold. It is scaled so its short side
    matches the output; the long side is covered by the fewest evenly spaced pieces whose
    neighbours overlap by at least `overlap` of a piece, the first flush with one end and the
    last flush with the other."""
    iw, ih = size
    threshold = min(1.0, max(0.0, threshold))
    overlap = min(0.9, max(0.0, overlap))
    ratio = split_ratio(size, width, height)
    if not (ratio < 1.0 and ratio <= threshold):
        return None
    tall = ih > iw
    if tall:
        across, piece = width, height
        length = ih * width // iw
        resized = (width, length)
    else:
        across, piece = height, width
        length = iw * height // ih
        resized = (length, height)
    if length <= piece:
        count = 1
    else:
        count = max(2, math.ceil((length - piece * overlap) / (piece * (1.0 - overlap))))
    step = (length - piece) / (count - 1) if count > 1 else 0.0
    boxes = []
    for i in range(count):
        start = int(step * i)
        if tall:
            boxes.append((0, start, across, start + piece))
        else:
            boxes.append((start, 0, start + piece, across))
    return SplitPlan(resized=resized, boxes=boxes)


def split_image(image: Image.Image, width: int, height: int, threshold: float = 0.5,
                overlap: float = 0.2) -> list[Image.Image] | None:
    plan = split_boxes(image.size, width, height, threshold, overlap)
    if plan is None:
        return None
    scaled = image.resize(plan.resized, LANCZOS)
    return [scaled.crop(box) for box in plan.boxes]


# --- auto focal point crop ----------------------------------------------------------------------

@dataclass
class Point:
    x: float
    y: float
    weight: float = 1.0


@dataclass
class FocalResult:
    image: Image.Image                 # the width x height crop
    box: tuple[int, int, int, int]     # crop box in the scaled image
    scaled_size: tuple[int, int]       # the source was scaled to this before cropping
    focus: Point                       # focal point in the scaled image
    points: dict[str, list[Point]] = field(default_factory=dict)  # per kind, scaled coords
    debug: Image.Image | None = None


def focal_crop(image: Image.Image, width: int, height: int, face_weight: float = 0.9,
               entropy_weight: float = 0.15, edges_weight: float = 0.5,
               face_detector: FaceDetector | None = None, debug: bool = False) -> FocalResult:
    """Scale the image to cover width x height and crop a width x height window centred, as far
    as the borders allow, on the focal point: the weighted average of the centroids of the
    detected faces, the highest-entropy window and the strongest corners. A kind of point with
    weight 0, or that finds nothing, drops out and the other weights are renormalised; with no
    points at all the crop is centred."""
    iw, ih = image.size
    scale = max(width / iw, height / ih)
    sw, sh = max(width, math.ceil(iw * scale - 1e-6)), max(height, math.ceil(ih * scale - 1e-6))
    scaled = image.resize((sw, sh), LANCZOS) if (sw, sh) != (iw, ih) else image.copy()
    rgb = scaled.convert("RGB")

    points: dict[str, list[Point]] = {}
    weights = {"face": face_weight, "entropy": entropy_weight, "edges": edges_weight}
    if face_weight > 0 and face_detector is not None:
        points["face"] = face_points(rgb, face_detector)
    if entropy_weight > 0:
        points["entropy"] = entropy_points(rgb, width, height)
    if edges_weight > 0:
        points["edges"] = edge_points(rgb)
    focus = weighted_focus(points, weights, (sw, sh))

    left = int(round(min(max(focus.x - width / 2, 0), sw - width)))
    top = int(round(min(max(focus.y - height / 2, 0), sh - height)))
    box = (left, top, left + width, top + height)
    result = FocalResult(image=scaled.crop(box), box=box, scaled_size=(sw, sh), focus=focus,
                         points=points)
    if debug:
        result.debug = draw_debug(rgb, result, weights)
    return result


def weighted_focus(points: dict[str, list[Point]], weights: dict[str, float],
                   size: tuple[int, int]) -> Point:
    present = {k: v for k, v in points.items() if v and weights.get(k, 0) > 0}
    total = sum(weights[k] for k in present)
    if not present or total <= 0:
        return Point(size[0] / 2, size[1] / 2)
    x = y = 0.0
    for kind, found in present.items():
        c = centroid(found)
        share = weights[kind] / total
        x += c.x * share
        y += c.y * share
    return Point(x, y)


def centroid(points: Sequence[Point]) -> Point:
    return Point(sum(p.x for p in points) / len(points), sum(p.y for p in points) / len(points))


def face_points(image: Image.Image, detector: FaceDetector) -> list[Point]:
    """One point per face: horizontally centred, a third of the way down the box (eyes)."""
    boxes = list(detector(image) or [])
    return [Point(x + w / 2, y + h / 3, 1.0) for x, y, w, h in boxes]


def entropy_points(image: Image.Image, width: int, height: int) -> list[Point]:
    """The centre of the width x height window, slid along the long axis in 4 px steps, whose
    grey-level histogram has the highest Shannon entropy (the most detailed region)."""
    iw, ih = image.size
    if iw > width:
        along_x = True
    elif ih > height:
        along_x = False
    else:
        return []
    grey = np.asarray(image.convert("L"), dtype=np.int64)
    if not along_x:
        grey = grey.T
        window = height
    else:
        window = width
    columns, levels = grey.shape[1], 64
    binned = grey * levels // 256
    # histogram per column, then windows by differences of cumulative sums
    hist = np.zeros((columns + 1, levels), dtype=np.int64)
    idx = (np.arange(columns)[None, :] * levels + binned).ravel()
    hist[1:] = np.bincount(idx, minlength=columns * levels).reshape(columns, levels)
    cum = np.cumsum(hist, axis=0)
    starts = np.arange(0, columns - window + 1, 4)
    if starts[-1] != columns - window:
        starts = np.append(starts, columns - window)
    counts = (cum[starts + window] - cum[starts]).astype(np.float64)
    prob = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(np.where(prob > 0, prob * np.log2(prob), 0.0), axis=1)
    best = int(starts[int(np.argmax(entropy))])
    if along_x:
        return [Point(best + width / 2, ih / 2)]
    return [Point(iw / 2, best + height / 2)]


def edge_points(image: Image.Image, max_corners: int = 100, quality: float = 0.04,
                min_distance_ratio: float = 0.06) -> list[Point]:
    """Strong corners (Shi-Tomasi minimum eigenvalue of the 3x3 structure tensor), at most
    `max_corners`, none closer than `min_distance_ratio` of the short side, ignoring the bottom
    tenth of the image where watermarks usually sit."""
    grey = np.asarray(image.convert("L"), dtype=np.float32)
    h, w = grey.shape
    if h < 5 or w < 5:
        return []
    grey = grey.copy()
    grey[int(h * 0.9):, :] = 153.0
    response = _min_eigenvalue(grey)
    peak = float(response.max())
    if peak <= 0:
        return []
    # local maxima above the quality level
    padded = np.pad(response, 1, mode="constant", constant_values=-np.inf)
    neighbourhood = np.max(np.stack([padded[dy:dy + h, dx:dx + w]
                                     for dy in range(3) for dx in range(3)]), axis=0)
    candidates = (response >= neighbourhood) & (response > quality * peak)
    ys, xs = np.nonzero(candidates)
    order = np.argsort(-response[ys, xs], kind="stable")[:20000]
    ys, xs = ys[order], xs[order]
    min_dist2 = (min(w, h) * min_distance_ratio) ** 2
    chosen: list[tuple[int, int]] = []
    picked = np.empty((0, 2), dtype=np.float64)
    for x, y in zip(xs, ys):
        if picked.size and np.min((picked[:, 0] - x) ** 2 + (picked[:, 1] - y) ** 2) < min_dist2:
            continue
        chosen.append((int(x), int(y)))
        picked = np.vstack([picked, [x, y]])
        if len(chosen) >= max_corners:
            break
    weight = 1.0 / len(chosen) if chosen else 1.0
    return [Point(float(x), float(y), weight) for x, y in chosen]


def _min_eigenvalue(grey: np.ndarray) -> np.ndarray:
    padded = np.pad(grey, 1, mode="edge")
    gx = ((padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:])
          - (padded[:-2, :-2] + 2 * padded[1:-1, :-2] + padded[2:, :-2])) / 8.0
    gy = ((padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:])
          - (padded[:-2, :-2] + 2 * padded[:-2, 1:-1] + padded[:-2, 2:])) / 8.0

    def box3(a: np.ndarray) -> np.ndarray:
        p = np.pad(a, 1, mode="edge")
        h, w = a.shape
        return sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))

    a, b, c = box3(gx * gx), box3(gx * gy), box3(gy * gy)
    return (a + c) / 2 - np.sqrt(((a - c) / 2) ** 2 + b * b)


_COLOURS = {"face": "#F00", "entropy": "#FF0", "edges": "#00F"}


def draw_debug(image: Image.Image, result: FocalResult, weights: dict[str, float]) -> Image.Image:
    """The scaled image with each kind's points, their centroid (sized by weight), the focal
    point and the crop rectangle drawn on it."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    radius = max(4.0, min(canvas.size) * 0.07)
    present = {k: v for k, v in result.points.items() if v and weights.get(k, 0) > 0}
    total = sum(weights[k] for k in present) or 1.0
    for kind, found in present.items():
        colour = _COLOURS.get(kind, "#FFF")
        for p in found:
            draw.rectangle((p.x - 2, p.y - 2, p.x + 2, p.y + 2), outline=colour)
        c = centroid(found)
        r = radius * weights[kind] / total
        draw.ellipse((c.x - r, c.y - r, c.x + r, c.y + r), outline=colour)
        draw.text((c.x - r, c.y - r - 12), f"{kind}: {weights[kind] / total:.2f}", fill=colour)
    f = result.focus
    draw.ellipse((f.x - radius, f.y - radius, f.x + radius, f.y + radius), outline="#0F0")
    x0, y0, x1, y1 = result.box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline="#0F0")
    return canvas


# --- auto-sized crop ----------------------------------------------------------------------------

def aspect_error(image_size: tuple[int, int], size: tuple[int, int]) -> float:
    """1 - (smaller / larger) of the image's and the candidate's aspect ratios (0 = same shape)."""
    (iw, ih), (w, h) = image_size, size
    r = (iw / ih) / (w / h)
    return 1.0 - (r if r < 1 else 1.0 / r)


def auto_size_candidates(min_dim: int, max_dim: int, step: int = 64) -> list[tuple[int, int]]:
    dims = range(min_dim, max_dim + 1, step)
    return [(w, h) for w in dims for h in dims]


def auto_size(image_size: tuple[int, int], min_dim: int = 384, max_dim: int = 768,
              min_area: int = 64 * 64, max_area: int = 640 * 640,
              objective: str = "Maximize area", threshold: float = 0.1) -> tuple[int, int] | None:
    """Pick (w, h) with w, h in min_dim, min_dim+64, ... <= max_dim, min_area <= w*h <= max_area
    and aspect_error <= threshold: the largest area (ties: smaller error) for "Maximize area",
    the smallest error (ties: larger area) for "Minimize error". None when nothing fits."""
    best, best_key = None, None
    for w, h in auto_size_candidates(min_dim, max_dim):
        if not (min_area <= w * h <= max_area):
            continue
        err = aspect_error(image_size, (w, h))
        if err > threshold:
            continue
        key = (w * h, -err) if objective == "Maximize area" else (-err, w * h)
        if best_key is None or key > best_key:
            best, best_key = (w, h), key
    return best


def auto_size_crop(image: Image.Image, **bounds) -> Image.Image | None:
    size = auto_size(image.size, **bounds)
    return None if size is None else center_crop(image, *size)
