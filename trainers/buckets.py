"""Aspect-ratio bucketing with kohya sd-scripts' rules.

Buckets (`make_buckets`): a square of the largest side that fits the area budget of
`max_reso`, plus, for every width from `min_size` to `max_size` in `step`s, the tallest height
(a multiple of `step`, at most `max_size`) whose area stays within the budget, and its transpose.
Every bucket has area <= max_reso's area and sides that are multiples of `step`.

Placing an image (`assign`): the bucket whose aspect ratio is closest to the image's (the
image's own size wins when it is a bucket); the image is scaled so that it covers the bucket
(the side with the larger relative overhang is cut) and centre-cropped.
With `no_upscale` (kohya's `bucket_no_upscale`) the predefined buckets are not used: an image
larger than the area budget is scaled down keeping its aspect ratio, one smaller is kept as it
is, and the bucket is that size rounded down to multiples of `step` (so small images stay small).

`BucketBatcher` forms batches only inside a bucket; the order of an epoch is a pure function of
(seed, epoch), so batch k of epoch e is the same in an interrupted and a resumed run."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Hashable, Sequence

from trainers import seeds

Size = tuple[int, int]  # (width, height)


class BucketError(ValueError):
    pass


@dataclass(frozen=True)
class Placement:
    bucket: Size  # (width, height) of the training image
    resized: Size  # the size the image is scaled to before cropping
    crop: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    ar_error: float  # bucket aspect ratio minus image aspect ratio


def make_buckets(max_reso: Size = (512, 512), min_size: int = 256, max_size: int = 1024,
                 step: int = 64) -> list[Size]:
    """The predefined bucket sizes, sorted, as kohya's `make_bucket_resolutions`."""
    width, height = (int(v) for v in max_reso)
    if step <= 0:
        raise BucketError(f"bucket_reso_steps: must be positive, got {step}")
    if width <= 0 or height <= 0:
        raise BucketError(f"resolution: must be positive, got {width}x{height}")
    if min_size % step or max_size % step:
        raise BucketError(f"min_bucket_reso/max_bucket_reso: {min_size} and {max_size} must be "
                          f"multiples of bucket_reso_steps ({step})")
    if min_size > max_size:
        raise BucketError(f"min_bucket_reso: {min_size} is larger than max_bucket_reso {max_size}")
    if max_size < max(width, height):
        raise BucketError(f"max_bucket_reso: {max_size} is smaller than the resolution "
                          f"{width}x{height}")
    area = width * height
    side = int(math.isqrt(area) // step) * step
    if side <= 0:
        raise BucketError(f"resolution: {width}x{height} is smaller than one bucket step ({step})")
    found = {(side, side)}
    w = min_size
    while w <= max_size:
        if w > 0:
            h = min(max_size, (area // w) // step * step)
            if h >= min_size and h > 0:
                found.add((w, h))
                found.add((h, w))
        w += step
    return sorted(found)


def _round_to_step(value: float, step: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % step


def _shrink_size(image_size: Size, max_area: int, step: int) -> Size:
    """bucket_no_upscale: the size an image is scaled to (kept when within the area budget)."""
    w, h = image_size
    if w * h <= max_area:
        return w, h
    aspect = w / h
    width = math.sqrt(max_area * aspect)
    height = max_area / width
    # Round either the width or the height to the step and keep the one whose aspect ratio
    # after rounding is closer to the image's.
    by_width = _round_to_step(width, step)
    height_for_width = _round_to_step(by_width / aspect, step)
    by_height = _round_to_step(height, step)
    width_for_height = _round_to_step(by_height * aspect, step)
    error_w = abs(by_width / height_for_width - aspect) if height_for_width else math.inf
    error_h = abs(width_for_height / by_height - aspect) if by_height else math.inf
    if error_w < error_h:
        return by_width, int(by_width / aspect + 0.5)
    return int(by_height * aspect + 0.5), by_height


def _centre_crop(resized: Size, bucket: Size) -> tuple[int, int, int, int]:
    left = (resized[0] - bucket[0]) // 2 if resized[0] > bucket[0] else 0
    top = (resized[1] - bucket[1]) // 2 if resized[1] > bucket[1] else 0
    return left, top, left + bucket[0], top + bucket[1]


def assign(image_size: Size, buckets: Sequence[Size], no_upscale: bool = False, *,
           max_area: int | None = None, step: int = 64) -> Placement:
    """Place an image of `image_size` (w, h).

    `buckets` is make_buckets' list (used unless `no_upscale`). With `no_upscale`, `max_area`
    is the area budget (max_reso's area; defaults to the largest bucket's area) and `step` the
    bucket step."""
    w, h = int(image_size[0]), int(image_size[1])
    if w <= 0 or h <= 0:
        raise BucketError(f"image size {w}x{h} is empty")
    aspect = w / h
    if not no_upscale:
        if not buckets:
            raise BucketError("no buckets to choose from")
        if (w, h) in set(buckets):
            bucket = (w, h)
        else:
            # the first bucket (in sorted order) with the smallest aspect-ratio error
            bucket = min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))
        if aspect > bucket[0] / bucket[1]:  # image is wider: match heights, cut the sides
            scale = bucket[1] / h
        else:  # image is taller (or equal): match widths, cut top and bottom
            scale = bucket[0] / w
        resized = (int(w * scale + 0.5), int(h * scale + 0.5))
        resized = (max(resized[0], bucket[0]), max(resized[1], bucket[1]))
    else:
        if max_area is None:
            if not buckets:
                raise BucketError("no_upscale needs max_area or a bucket list")
            max_area = max(bw * bh for bw, bh in buckets)
        resized = _shrink_size((w, h), int(max_area), step)
        bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
        if bucket[0] <= 0 or bucket[1] <= 0:
            raise BucketError(f"image size {w}x{h} is smaller than one bucket step ({step} px)")
    return Placement(bucket=bucket, resized=resized, crop=_centre_crop(resized, bucket),
                     ar_error=bucket[0] / bucket[1] - aspect)


def kohya_crop_ltrb(bucket: Size, original_size: Size) -> tuple[float, float, float, float]:
    """The `crop_ltrb` kohya stores in latent caches (SDXL size conditioning): where the image,
    fitted inside the bucket, would sit (left, top, right, bottom)."""
    bucket_aspect = bucket[0] / bucket[1]
    image_aspect = original_size[0] / original_size[1]
    if bucket_aspect > image_aspect:
        fitted_w, fitted_h = bucket[1] * image_aspect, bucket[1]
    else:
        fitted_w, fitted_h = bucket[0], bucket[0] / image_aspect
    left = (bucket[0] - fitted_w) // 2
    top = (bucket[1] - fitted_h) // 2
    return left, top, left + fitted_w, top + fitted_h


class BucketBatcher:
    """Batches that never mix buckets, in an order that is a pure function of (seed, epoch).

    `items` holds one (key, bucket) pair per appearance in an epoch (an image with 20 repeats
    appears 20 times). Each epoch every bucket's items are shuffled and cut into batches of
    `batch_size` (the last one of a bucket may be smaller, as in kohya), and the batches of all
    buckets are shuffled together."""

    def __init__(self, items: Sequence[tuple[Hashable, Size]], batch_size: int, seed: int,
                 salt: Hashable = ""):
        if batch_size < 1:
            raise BucketError(f"batch_size: must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.salt = salt
        groups: dict[Size, list[Hashable]] = {}
        for key, bucket in items:
            groups.setdefault(tuple(bucket), []).append(key)
        self.buckets: dict[Size, list[Hashable]] = {b: groups[b] for b in sorted(groups)}
        self.batches_per_epoch = sum(math.ceil(len(keys) / batch_size)
                                     for keys in self.buckets.values())
        self._epoch = lru_cache(maxsize=2)(self._make_epoch)

    def epoch(self, epoch: int) -> list[tuple[Size, list[Hashable]]]:
        """[(bucket, keys)] for every batch of `epoch`, in training order."""
        return self._epoch(epoch)

    def _make_epoch(self, epoch: int) -> list[tuple[Size, list[Hashable]]]:
        batches = []
        for bucket, keys in self.buckets.items():
            order = list(keys)
            seeds.rng(self.seed, "bucket-items", self.salt, epoch, bucket).shuffle(order)
            for start in range(0, len(order), self.batch_size):
                batches.append((bucket, order[start:start + self.batch_size]))
        seeds.rng(self.seed, "bucket-batches", self.salt, epoch).shuffle(batches)
        return batches
