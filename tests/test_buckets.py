"""Aspect-ratio buckets with kohya's rules, and batches that never mix buckets."""
from __future__ import annotations

from collections import Counter

import pytest

from trainers.buckets import BucketBatcher, BucketError, assign, kohya_crop_ltrb, make_buckets

# kohya's make_bucket_resolutions((512, 512), 256, 1024, 64), worked out by hand: the 512 square,
# and for widths 256..1024 the tallest multiple of 64 (<= 1024) with area <= 512*512.
SD15_BUCKETS = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768),
                (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
                (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]


def test_default_buckets_are_kohyas():
    assert make_buckets((512, 512), 256, 1024, 64) == SD15_BUCKETS


@pytest.mark.parametrize("max_reso,min_size,max_size,step", [
    ((512, 512), 256, 1024, 64), ((768, 512), 256, 1024, 64), ((1024, 1024), 512, 2048, 64),
    ((640, 448), 320, 960, 32), ((64, 64), 32, 128, 16)])
def test_every_bucket_within_area_and_on_the_step(max_reso, min_size, max_size, step):
    buckets = make_buckets(max_reso, min_size, max_size, step)
    assert buckets == sorted(set(buckets))
    budget = max_reso[0] * max_reso[1]
    for w, h in buckets:
        assert w * h <= budget
        assert w % step == 0 and h % step == 0
        assert w <= max_size and h <= max_size
    assert (w, h) in buckets and (h, w) in buckets  # transposes come in pairs


@pytest.mark.parametrize("name,size,bucket", [
    ("1:1", (768, 768), (512, 512)),
    ("2:3", (400, 600), (384, 640)),
    ("3:2", (600, 400), (640, 384)),
    ("16:9", (1920, 1080), (640, 384)),
    ("9:16", (1080, 1920), (384, 640)),
    ("1:4", (300, 1200), (256, 1024)),
])
def test_each_aspect_ratio_lands_in_the_documented_bucket(name, size, bucket):
    placement = assign(size, SD15_BUCKETS)
    assert placement.bucket == bucket, name
    rw, rh = placement.resized
    # the image is scaled to cover the bucket exactly on one side, then centre-cropped
    assert rw >= bucket[0] and rh >= bucket[1]
    assert rw == bucket[0] or rh == bucket[1]
    left, top, right, bottom = placement.crop
    assert (right - left, bottom - top) == bucket
    assert 0 <= left and 0 <= top and right <= rw and bottom <= rh
    assert abs(left - (rw - right)) <= 1 and abs(top - (rh - bottom)) <= 1


def test_an_image_of_a_bucket_size_is_used_as_it_is():
    placement = assign((448, 576), SD15_BUCKETS)
    assert placement.bucket == (448, 576) and placement.resized == (448, 576)
    assert placement.crop == (0, 0, 448, 576)


def test_no_upscale_keeps_small_images_small():
    small = assign((300, 200), SD15_BUCKETS, no_upscale=True, max_area=512 * 512, step=64)
    assert small.resized == (300, 200)  # not scaled at all
    assert small.bucket == (256, 192)  # rounded down to the step, not up to 512-ish
    assert small.crop == (22, 4, 278, 196)
    # with upscaling allowed the same image is blown up into a predefined bucket
    assert assign((300, 200), SD15_BUCKETS).bucket == (640, 384)


def test_no_upscale_shrinks_large_images_within_the_area_budget():
    for size in [(2000, 1000), (4000, 3000), (1000, 4000), (513, 513)]:
        placement = assign(size, [], no_upscale=True, max_area=512 * 512, step=64)
        w, h = placement.bucket
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0
        rw, rh = placement.resized
        assert rw >= w and rh >= h
        assert abs(rw / rh - size[0] / size[1]) < 0.02  # aspect ratio kept
    assert assign((2000, 1000), [], no_upscale=True, max_area=512 * 512).bucket == (640, 320)


def test_no_upscale_rejects_images_smaller_than_a_step():
    with pytest.raises(BucketError, match="smaller than one bucket step"):
        assign((50, 400), [], no_upscale=True, max_area=512 * 512, step=64)


def test_bucket_settings_are_checked():
    with pytest.raises(BucketError, match="max_bucket_reso"):
        make_buckets((1024, 1024), 256, 768, 64)
    with pytest.raises(BucketError, match="multiples of bucket_reso_steps"):
        make_buckets((512, 512), 250, 1024, 64)


def test_kohya_crop_ltrb():
    # a 2:1 image in a square bucket sits in a centred 512x256 band
    assert kohya_crop_ltrb((512, 512), (1000, 500)) == (0, 128, 512, 384)
    assert kohya_crop_ltrb((512, 512), (500, 1000)) == (128, 0, 384, 512)


def _items():
    buckets = [(512, 512)] * 7 + [(384, 640)] * 5 + [(640, 384)] * 3
    return [(f"img{i}", b) for i, b in enumerate(buckets)]


def test_batches_never_mix_buckets_and_cover_the_epoch():
    items = _items()
    batcher = BucketBatcher(items, batch_size=2, seed=3)
    assert batcher.batches_per_epoch == 4 + 3 + 2  # ceil per bucket
    where = dict(items)
    for epoch in range(3):
        batches = batcher.epoch(epoch)
        assert len(batches) == batcher.batches_per_epoch
        seen = Counter()
        for bucket, keys in batches:
            assert 1 <= len(keys) <= 2
            assert {where[k] for k in keys} == {bucket}
            seen.update(keys)
        assert seen == Counter(k for k, _ in items)


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    items = _items()
    first = BucketBatcher(items, 2, seed=3)
    again = BucketBatcher(list(items), 2, seed=3)
    assert again.epoch(5) == first.epoch(5)  # asked out of order, on a fresh object
    assert first.epoch(0) == again.epoch(0)
    assert first.epoch(0) != first.epoch(1)
    other = BucketBatcher(items, 2, seed=4)
    assert other.epoch(0) != first.epoch(0)


def test_repeated_items_appear_once_per_repeat():
    items = [("a", (64, 64))] * 3 + [("b", (64, 64))]
    batches = BucketBatcher(items, 4, seed=0).epoch(0)
    assert len(batches) == 1 and Counter(batches[0][1]) == Counter({"a": 3, "b": 1})


def test_kohya_and_fine_tune_datasets_refuse_bad_bucket_settings_alike(tmp_path):
    """One bucket maker for both loaders: the same settings error, by field, from each."""
    from core.config import ConfigError
    from trainers.finetune_data import scan_metadata
    from trainers.kohya_data import DatasetConfig, SubsetConfig, scan_dataset
    config = DatasetConfig(subsets=[SubsetConfig(image_dir=tmp_path)], enable_bucket=True,
                           min_bucket_reso=100, max_bucket_reso=1024, bucket_reso_steps=64)
    messages = []
    for scan in (scan_dataset, lambda c: scan_metadata(c, {})):
        with pytest.raises(ConfigError) as caught:
            scan(config)
        messages.append(str(caught.value))
    assert messages[0] == messages[1]
    assert "min_bucket_reso/max_bucket_reso: 100 and 1024 must be multiples" in messages[0]
