"""Transforms of the Preprocess job: split, focal crop, auto-size, resizes, flips."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from preprocess import transforms as tf
from tests.conftest import photo


def grey(size, value=128):
    return Image.new("RGB", size, (value, value, value))


def checkerboard(size, cell=8):
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    board = (((xs // cell) + (ys // cell)) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board] * 3, axis=-1))


# --- split --------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,target,overlap", [
    ((512, 2048), (512, 512), 0.2), ((3000, 800), (512, 512), 0.2), ((600, 2000), (256, 384), 0.5),
    ((2000, 600), (384, 256), 0.0), ((640, 2560), (512, 512), 0.9)])
def test_split_pieces_cover_the_long_side_with_the_fewest_overlapping_pieces(size, target,
                                                                              overlap):
    width, height = target
    plan = tf.split_boxes(size, width, height, threshold=0.5, overlap=overlap)
    assert plan is not None
    tall = size[1] > size[0]
    # scaled so the short side matches the output, aspect kept (integer division)
    if tall:
        assert plan.resized[0] == width
        assert abs(plan.resized[1] - size[1] * width / size[0]) < 1
    else:
        assert plan.resized[1] == height
        assert abs(plan.resized[0] - size[0] * height / size[1]) < 1
    length, piece = (plan.resized[1], height) if tall else (plan.resized[0], width)
    starts = [box[1] if tall else box[0] for box in plan.boxes]
    for box in plan.boxes:  # every piece is the output size and lies inside the scaled image
        assert (box[2] - box[0], box[3] - box[1]) == (width, height)
        assert box[0] >= 0 and box[1] >= 0
        assert box[2] <= plan.resized[0] and box[3] <= plan.resized[1]
    assert starts[0] == 0 and starts[-1] + piece == length  # flush with both ends
    assert starts == sorted(starts)
    gaps = np.diff(starts)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced
    for gap in gaps:  # neighbours overlap by at least the ratio (within rounding)
        assert piece - gap >= piece * overlap - 1
    # one piece fewer could not reach the end with that overlap
    fewer = len(starts) - 1
    assert fewer < 2 or (fewer - 1) * piece * (1 - overlap) + piece < length


def test_split_threshold_decides_which_images_are_split():
    # ratio of a 512x1024 image against 512x512 is 0.5
    assert tf.split_ratio((512, 1024), 512, 512) == pytest.approx(0.5)
    assert tf.split_boxes((512, 1024), 512, 512, threshold=0.5) is not None
    assert tf.split_boxes((512, 1024), 512, 512, threshold=0.45) is None
    assert tf.split_boxes((512, 700), 512, 512, threshold=0.5) is None  # only a bit tall
    assert tf.split_boxes((512, 512), 512, 512, threshold=1.0) is None  # ratio 1 never splits
    # the ratio is relative to the output shape: tall image, even taller output -> no split
    assert tf.split_ratio((400, 800), 256, 768) > 1
    assert tf.split_boxes((400, 800), 256, 768, threshold=1.0) is None


def test_split_with_threshold_one_and_barely_long_image_does_not_crash():
    plan = tf.split_boxes((512, 515), 512, 512, threshold=1.0, overlap=0.2)
    assert plan is not None and len(plan.boxes) >= 1
    assert all(box[3] <= plan.resized[1] for box in plan.boxes)


def test_split_image_on_a_real_photo_returns_pieces_of_the_output_size():
    tall = photo(1, 256).resize((200, 900))
    pieces = tf.split_image(tall, 128, 128, threshold=0.5, overlap=0.2)
    assert pieces and len(pieces) >= 4
    assert all(p.size == (128, 128) for p in pieces)
    top = np.asarray(pieces[0], dtype=float)
    expected = np.asarray(tall.resize((128, 900 * 128 // 200), Image.Resampling.LANCZOS)
                          .crop((0, 0, 128, 128)), dtype=float)
    assert np.abs(top - expected).mean() < 1


# --- focal crop ---------------------------------------------------------------------------------

def _side_detail_image(side: str, kind: str = "edges", size=(512, 256)):
    image = grey(size)
    w, h = size
    patch = checkerboard((w // 4, h)) if kind == "edges" else Image.fromarray(
        np.random.default_rng(0).integers(0, 256, (h, w // 4, 3), dtype=np.uint8))
    image.paste(patch, (0 if side == "left" else w - w // 4, 0))
    return image


@pytest.mark.parametrize("side", ["left", "right"])
def test_focal_crop_moves_toward_edges(side):
    image = _side_detail_image(side, "edges")
    result = tf.focal_crop(image, 128, 128, face_weight=0, entropy_weight=0, edges_weight=1)
    sw, sh = result.scaled_size
    assert (sw, sh) == (256, 128)
    assert result.points["edges"]
    centre_left = (sw - 128) / 2
    if side == "left":
        assert result.box[0] < centre_left
    else:
        assert result.box[0] > centre_left
    assert result.image.size == (128, 128)


@pytest.mark.parametrize("side", ["left", "right"])
def test_focal_crop_moves_toward_the_most_detailed_region(side):
    image = _side_detail_image(side, "noise")
    result = tf.focal_crop(image, 128, 128, face_weight=0, entropy_weight=1, edges_weight=0)
    centre_left = (result.scaled_size[0] - 128) / 2
    assert (result.box[0] < centre_left) if side == "left" else (result.box[0] > centre_left)


def test_focal_crop_moves_toward_a_detected_face_and_renormalises_weights():
    image = photo(0, 256).resize((600, 300))
    seen = []

    def detector(img):
        seen.append(img.size)
        return [(img.width - 60, 20, 40, 40)]  # a face near the right edge

    result = tf.focal_crop(image, 128, 128, face_weight=0.9, entropy_weight=0,
                           edges_weight=0, face_detector=detector)
    assert seen == [result.scaled_size]
    x0, y0, x1, y1 = result.box
    face_x = result.scaled_size[0] - 60 + 20
    assert x0 <= face_x < x1
    assert x1 == result.scaled_size[0]  # pushed against the right border
    # with a zero face weight the detector is ignored
    seen.clear()
    other = tf.focal_crop(image, 128, 128, face_weight=0, entropy_weight=0, edges_weight=0,
                          face_detector=detector)
    assert not seen
    assert other.box[0] == (other.scaled_size[0] - 128) // 2  # nothing to go by: centred


@pytest.mark.parametrize("index,size,target", [(0, (300, 500), (128, 128)),
                                               (1, (640, 360), (128, 192)),
                                               (2, (200, 900), (256, 128)),
                                               (3, (901, 333), (64, 64))])
def test_focal_crop_stays_inside_the_image_for_real_photos(index, size, target):
    image = photo(index, 256).resize(size)
    result = tf.focal_crop(image, *target, debug=True)
    sw, sh = result.scaled_size
    assert sw >= target[0] and sh >= target[1]
    assert min(abs(sw / sh - size[0] / size[1]), 1) < 0.05  # aspect kept
    x0, y0, x1, y1 = result.box
    assert 0 <= x0 and 0 <= y0 and x1 <= sw and y1 <= sh
    assert (x1 - x0, y1 - y0) == target and result.image.size == target
    assert result.debug is not None and result.debug.size == (sw, sh)
    assert 0 <= result.focus.x <= sw and 0 <= result.focus.y <= sh


def test_edge_points_ignore_the_bottom_tenth_and_keep_their_distance():
    image = grey((200, 200))
    image.paste(checkerboard((200, 20)), (0, 185))  # only in the bottom 10 %: watermark zone
    assert tf.edge_points(image) == []
    points = tf.edge_points(checkerboard((200, 200), cell=10))
    assert 0 < len(points) <= 100
    spacing = 200 * 0.06
    for i, p in enumerate(points):
        for q in points[i + 1:]:
            assert math.hypot(p.x - q.x, p.y - q.y) >= spacing - 1e-6


# --- auto-sized crop ----------------------------------------------------------------------------

def test_auto_size_documented_examples():
    # 1000x700 has aspect 1.4286: 640x448 matches it exactly, 768x512 (1.5) is larger
    assert tf.auto_size((1000, 700), objective="Maximize area") == (768, 512)
    assert tf.auto_size((1000, 700), objective="Minimize error") == (640, 448)
    assert tf.auto_size((1000, 1000)) == (640, 640)  # the largest square within 640*640
    assert tf.auto_size((3000, 300)) is None  # 10:1 cannot be met from 384..768
    assert tf.auto_size((3000, 300), threshold=1.0) is not None


@pytest.mark.parametrize("size", [(1000, 700), (512, 900), (1920, 1080), (333, 333), (800, 500)])
@pytest.mark.parametrize("objective", ["Maximize area", "Minimize error"])
def test_auto_size_is_the_best_candidate_of_the_grid(size, objective):
    bounds = dict(min_dim=384, max_dim=768, min_area=200_000, max_area=500_000, threshold=0.15)
    chosen = tf.auto_size(size, objective=objective, **bounds)
    grid = [(w, h) for w in range(384, 769, 64) for h in range(384, 769, 64)]
    allowed = [c for c in grid if 200_000 <= c[0] * c[1] <= 500_000
               and tf.aspect_error(size, c) <= 0.15]
    if not allowed:
        assert chosen is None
        return
    assert chosen in allowed
    err = tf.aspect_error(size, chosen)
    for other in allowed:
        if objective == "Maximize area":
            assert other[0] * other[1] <= chosen[0] * chosen[1]
        else:
            assert tf.aspect_error(size, other) >= err - 1e-12


def test_auto_size_crop_is_centred_and_of_the_chosen_size():
    image = photo(3, 256).resize((1000, 700))
    out = tf.auto_size_crop(image, objective="Minimize error")
    assert out.size == (640, 448)
    assert tf.aspect_error((1000, 700), (640, 448)) == pytest.approx(0, abs=1e-9)


# --- plain resizes and flips ---------------------------------------------------------------------

def test_resize_crop_keeps_the_centre():
    image = grey((300, 100), 0)
    image.paste((255, 255, 255), (100, 0, 200, 100))  # white centre third
    out = tf.resize_crop(image, 64, 64)
    assert out.size == (64, 64)
    assert np.asarray(out)[:, 8:56].mean() > 250


def test_resize_fill_stretches_edges_into_the_margins():
    image = Image.new("RGB", (100, 50), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 100, 10))  # a blue top band
    out = np.asarray(tf.resize_fill(image, 64, 64))
    assert out.shape == (64, 64, 3)
    assert (out[0, 32] == [0, 0, 255]).all()  # top margin repeats the top row
    assert (out[-1, 32] == [255, 0, 0]).all()
    assert (out[32, 32] == [255, 0, 0]).all()


def test_mirror_and_swapped_flip_captions():
    image = photo(0, 64)
    assert np.array_equal(np.asarray(tf.mirror(image)), np.asarray(image)[:, ::-1])
    assert tf.swap_left_right("Left hand, right eye, RIGHT, looking left") == \
        "Right hand, left eye, LEFT, looking right"
    assert tf.swap_left_right("bright leftover, copyright") == "bright leftover, copyright"
